#!/usr/bin/env bash
# Installs what the deploy and browser end-to-end tests need, on a fresh Debian machine too:
# Debian packages (debootstrap for the base image, Chromium and its WebDriver, python3-venv,
# docker-compose when no compose is installed) and the pinned Python packages of
# requirements-deploy.txt in a venv (KT_E2E_VENV, default ~/.cache/kt/venv-e2e), reinstalled
# only when that file changes. Prints the venv's python on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${KT_E2E_VENV:-$HOME/.cache/kt/venv-e2e}"
sudo=""
[[ $(id -u) -eq 0 ]] || sudo=sudo

need=()
command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || need+=(debootstrap)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || need+=(docker-compose)
if ((${#need[@]})); then
  echo "setup-deploy: apt-get install ${need[*]}" >&2
  $sudo apt-get update -q >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
command -v docker >/dev/null || { echo "setup-deploy: the Docker engine is not installed" >&2; exit 1; }

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
want="$(sha256sum "$here/requirements-deploy.txt" | cut -d' ' -f1)"
if [[ "$(cat "$venv/.kt-requirements" 2>/dev/null)" != "$want" ]]; then
  echo "setup-deploy: pip install -r requirements-deploy.txt into $venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-deploy.txt" >&2
  echo "$want" > "$venv/.kt-requirements"
fi
echo "$venv/bin/python"
