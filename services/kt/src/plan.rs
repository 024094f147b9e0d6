//! `kt plan check` / `kt plan show`: validate a placement plan against a model's config or GGUF
//! header (no weights needed) and print where everything goes. The work is in `kt-plan`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use kt_models::moe::DEFAULT_INT8_FROM;
use kt_plan::{resolve, ExpertFormat, Limits, ModelShape, Placement, Plan, WeightDtype, GIB};

#[derive(Args)]
pub struct PlanArgs {
    #[command(subcommand)]
    command: PlanCommand,
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Check that every tensor is placed once and that memory fits; non-zero exit otherwise.
    Check(PlanModelArgs),
    /// Print the resolved placement with bytes per device and per expert server.
    Show {
        #[command(flatten)]
        common: PlanModelArgs,
        /// Also list every tensor with its shape, bytes and place.
        #[arg(long)]
        tensors: bool,
    },
}

#[derive(Args)]
struct PlanModelArgs {
    /// HF folder or config.json / shape description, or a GGUF file or folder.
    #[arg(long, env = "KT_MODEL")]
    model: PathBuf,
    /// The placement plan (rules/*.yaml).
    #[arg(long, env = "KT_PLAN")]
    plan: PathBuf,
    /// GPU memory per cuda device, GiB.
    #[arg(long, env = "KT_GPU_MEM")]
    gpu_mem: Option<f64>,
    /// Host memory per expert server (NUMA node) and for a cpu worker device, GiB.
    #[arg(long, env = "KT_HOST_MEM")]
    host_mem: Option<f64>,
    /// Storage type assumed for a config.json model (bf16, f16, f32, q8_0, q6_k, q5_k, q4_k,
    /// q4_0, q3_k, q2_k); default bf16. GGUF files have their own.
    #[arg(long, env = "KT_PLAN_DTYPE")]
    dtype: Option<String>,
}

fn gib(v: Option<f64>, flag: &str) -> Result<Option<u64>> {
    match v {
        None => Ok(None),
        Some(g) if g.is_finite() && g > 0.0 => Ok(Some((g * GIB as f64) as u64)),
        Some(g) => bail!("{flag} {g}: give a positive number of GiB"),
    }
}

pub fn run(args: PlanArgs) -> Result<()> {
    let (a, tensors, check) = match &args.command {
        PlanCommand::Check(a) => (a, false, true),
        PlanCommand::Show { common, tensors } => (common, *tensors, false),
    };
    let dtype = match &a.dtype {
        None => None,
        Some(d) => Some(WeightDtype::parse(d).ok_or_else(|| {
            anyhow::anyhow!(
                "--dtype {d}: use bf16, f16, f32, q8_0, q6_k, q5_k, q4_k, q4_0, q3_k or q2_k"
            )
        })?),
    };
    let limits = Limits { gpu: gib(a.gpu_mem, "--gpu-mem")?, host: gib(a.host_mem, "--host-mem")? };
    let plan = Plan::load(&a.plan)?;
    let model = ModelShape::open(&a.model, dtype)?;
    if check {
        let placement = checked(&plan, &model, &limits)?;
        let gpus: Vec<String> = plan
            .devices
            .iter()
            .zip(&placement.devices)
            .map(|(d, u)| format!("{d} {}", kt_plan::resolve::gib(u.bytes)))
            .collect();
        println!(
            "ok: {} places all {} tensors of {} ({})",
            plan.file,
            model.tensors.len(),
            model.name,
            gpus.join(", ")
        );
    } else {
        let placement = resolve(&plan, &model, &limits);
        print!("{}", placement.render(tensors));
        if !placement.ok() {
            bail!("{}: {} problem(s)", plan.file, placement.problems.len());
        }
    }
    Ok(())
}

/// Resolves `plan` against `model` as `kt plan check` does: warnings and every problem go to
/// stderr naming the plan file, and any problem is an error.
pub fn checked<'a>(
    plan: &'a Plan,
    model: &'a ModelShape,
    limits: &Limits,
) -> Result<Placement<'a>> {
    let placement = resolve(plan, model, limits);
    for w in &placement.warnings {
        eprintln!("warning: {w}");
    }
    if !placement.ok() {
        for p in &placement.problems {
            eprintln!("error: {}: {p}", plan.file);
        }
        let first =
            placement.problems.first().map(|p| format!(" (first: {p})")).unwrap_or_default();
        bail!("{}: {} problem(s) with {}{first}", plan.file, placement.problems.len(), model.name);
    }
    Ok(placement)
}

/// The `--int8-from` a plan's expert kernel asks of a process that computes its routed experts
/// itself: decode `amx_int8` is every call (0); prefill `amx_int8` alone is `flag` or
/// [`DEFAULT_INT8_FROM`] tokens; `native` for both keeps `flag`. kt computes no other format.
pub fn int8_from_for(
    decode: ExpertFormat,
    prefill: ExpertFormat,
    flag: Option<usize>,
) -> Result<Option<usize>, String> {
    let plan = ExpertFormat::int8_from(decode, prefill, flag.unwrap_or(DEFAULT_INT8_FROM))?;
    Ok(plan.or(flag))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ExpertFormat::{AmxBf16, AmxInt4, AmxInt8, Bf16, Native};

    #[test]
    fn kernel_formats_map_to_int8_from() {
        assert_eq!(int8_from_for(Native, Native, None), Ok(None));
        assert_eq!(int8_from_for(Native, Native, Some(7)), Ok(Some(7)));
        assert_eq!(int8_from_for(AmxInt8, AmxInt8, Some(7)), Ok(Some(0)));
        assert_eq!(int8_from_for(AmxInt8, Native, None), Ok(Some(0)));
        assert_eq!(int8_from_for(Native, AmxInt8, None), Ok(Some(DEFAULT_INT8_FROM)));
        assert_eq!(int8_from_for(Native, AmxInt8, Some(32)), Ok(Some(32)));
        for f in [Bf16, AmxBf16, AmxInt4] {
            let e = int8_from_for(Native, f, None).unwrap_err();
            assert!(e.contains(f.name()) && e.contains("not implemented"), "{e}");
            assert!(int8_from_for(f, AmxInt8, None).is_err());
        }
    }
}
