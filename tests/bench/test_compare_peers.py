"""Cheap checks of compare_peers.py that run no benchmark (standard library only):

    python3 -m unittest discover -s tests/bench -p 'test_*.py'
"""

import contextlib
import io
import os
import subprocess
import sys
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare_peers  # noqa: E402


class Args(unittest.TestCase):
    def test_help(self):
        for script in ("compare_peers.py", "ktk_moe.py"):
            r = subprocess.run([sys.executable, str(HERE / script), "--help"],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("--threads", r.stdout)

    def test_threads_and_only(self):
        a = compare_peers.parse_args(["--threads", "2,1,2", "--only", "kt,llama"])
        self.assertEqual(a.threads, [1, 2])
        self.assertEqual(a.only, ["kt", "llama"])

    def test_bad_values_are_refused(self):
        for bad in (["--only", "vllm"], ["--threads", "x"], ["--threads", "0"]):
            with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
                compare_peers.parse_args(bad)

    def test_env_is_read(self):
        os.environ["KT_BENCH_ONLY"] = "ktkernel"
        try:
            self.assertEqual(compare_peers.parse_args([]).only, ["ktkernel"])
        finally:
            del os.environ["KT_BENCH_ONLY"]

    def test_missing_peers_are_reported_not_fatal(self):
        r = subprocess.run(
            [sys.executable, str(HERE / "compare_peers.py"), "--only", "llama,ktkernel",
             "--llama-bench", "/nonexistent/llama-bench", "--ktk-python", "/nonexistent/py"],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 1)  # nothing could run
        self.assertIn("MISSING llama", r.stdout)
        self.assertIn("MISSING ktkernel", r.stdout)

    def test_llama_json_is_read(self):
        text = 'noise\n[\n {"n_prompt": 512, "n_gen": 0, "avg_ts": 22.1, "stddev_ts": 0.3},\n' \
               ' {"n_prompt": 0, "n_gen": 64, "avg_ts": 7.05, "stddev_ts": 0.1}\n]\n'
        j = compare_peers.last_json(text)
        self.assertEqual(len(j), 2)
        # kt-kernel's C++ side prints before and after the JSON line.
        j = compare_peers.last_json('{ log\n{"results": [1]}\nCPUInfer[0x1]: Goodbye\n')
        self.assertEqual(j, {"results": [1]})
        self.assertEqual(compare_peers.find_rate({"prefill": {"tok_s": 3.0}}, ("prefill",)),
                         3.0)


if __name__ == "__main__":
    unittest.main()
