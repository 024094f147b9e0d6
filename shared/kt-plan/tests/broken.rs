//! Broken plans give errors naming the file, the line and the field or rule; resolution
//! problems name what is wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use kt_plan::{resolve, Limits, ModelShape, Plan, Problem, GIB};

const GOOD: &str = "\
model: {arch: qwen3moe, name: t}
worker: {devices: [cpu, cuda:0]}
experts:
  servers: {numa0: {numa: 0}, numa1: {numa: 1}}
  split: by_expert
  assign: round_robin
rules:
  - {match: '\\.experts\\.\\d+\\.', kind: experts, place: experts}
  - {match: '^model\\.layers\\.', place: cuda:0}
  - {match: '.*', place: cpu}
";

fn err(text: &str) -> String {
    Plan::parse("p.yaml", text).unwrap_err().to_string()
}

fn fixture() -> ModelShape {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3moe/hf");
    ModelShape::open(dir, None).unwrap()
}

#[test]
fn good_plan_parses() {
    let p = Plan::parse("p.yaml", GOOD).unwrap();
    assert_eq!(p.rules.len(), 3);
    assert_eq!(
        p.rules.iter().map(|r| r.line).collect::<Vec<_>>(),
        vec![Some(8), Some(9), Some(10)]
    );
    let m = fixture();
    let r = resolve(&p, &m, &Limits::default());
    assert!(r.ok(), "{}", r.render(true));
}

#[test]
fn bad_yaml_names_file_and_line() {
    let e = err("model: {arch: qwen3moe\nworker: [");
    assert!(e.starts_with("p.yaml:"), "{e}");
    let e = err(&GOOD.replace("  split: by_expert", "  split: by_expert\n  colour: red"));
    assert!(e.contains("p.yaml:") && e.contains("colour"), "{e}");
    let e = err(&GOOD.replace("place: cpu}", "place: cpu, extra: 1}"));
    assert!(e.contains("p.yaml:10") && e.contains("extra"), "{e}");
    let e = err(&GOOD.replace("split: by_expert", "split: diagonal"));
    assert!(e.contains("p.yaml:5") && e.contains("diagonal"), "{e}");
}

#[test]
fn bad_rules_name_index_line_and_pattern() {
    let e = err(&GOOD.replace("'^model\\.layers\\.'", "'^model\\.layers\\.('"));
    assert!(e.contains("p.yaml:9") && e.contains("rules[1]") && e.contains("bad regex"), "{e}");
    let e = err(&GOOD.replace("place: cuda:0}", "place: cuda:3}"));
    assert!(e.contains("p.yaml:9") && e.contains("cuda:3") && e.contains("worker.devices"), "{e}");
    let e = err(&GOOD.replace("place: cpu}", "place: tpu}"));
    assert!(e.contains("p.yaml:10") && e.contains("tpu"), "{e}");
    let e = err(&GOOD.replace("kind: experts", "kind: lasers"));
    assert!(e.contains("p.yaml:8") && e.contains("lasers"), "{e}");
    let no_tier =
        "model: {arch: llama}\nworker: {devices: [cpu]}\nrules:\n  - {match: x, place: experts}\n";
    assert!(err(no_tier).contains("p.yaml:4"), "{}", err(no_tier));
}

#[test]
fn bad_devices_servers_and_splits() {
    let e = err(&GOOD.replace("[cpu, cuda:0]", "[cpu, gpu0]"));
    assert!(e.contains("p.yaml:2") && e.contains("gpu0"), "{e}");
    let e = err(&GOOD.replace("[cpu, cuda:0]", "[cpu, cpu]"));
    assert!(e.contains("twice"), "{e}");
    let e = err(&GOOD.replace("{numa0: {numa: 0}, numa1: {numa: 1}}", "{}"));
    assert!(e.contains("p.yaml:4") && e.contains("no servers"), "{e}");
    let e = err(&GOOD.replace("{numa: 1}", "{numa: 1, replicas: [numa7]}"));
    assert!(e.contains("numa7") && e.contains("p.yaml:4"), "{e}");
    let e = err(&GOOD.replace("assign: round_robin", "assign: {numa0: \"0-2\", numa9: \"3\"}"));
    assert!(e.contains("numa9"), "{e}");
    let e = err(&GOOD.replace("assign: round_robin", "assign: {numa0: \"0-2\", numa1: \"2-3\"}"));
    assert!(e.contains("both") && e.contains("p.yaml:6"), "{e}");
    let by_layer = GOOD.replace(
        "split: by_expert\n  assign: round_robin",
        "split: by_layer\n  layers: {numa0: \"0-1\", numa1: \"1\"}",
    );
    assert!(err(&by_layer).contains("both"), "{}", err(&by_layer));
    let missing = GOOD.replace("split: by_expert\n  assign: round_robin", "split: by_layer");
    assert!(err(&missing).contains("needs"), "{}", err(&missing));
    let wrong = GOOD.replace("assign: round_robin", "layers: {numa0: \"0\"}");
    assert!(err(&wrong).contains("by_layer"), "{}", err(&wrong));
    let bad_range = GOOD.replace("assign: round_robin", "assign: {numa0: \"3-1\"}");
    assert!(err(&bad_range).contains("3-1"), "{}", err(&bad_range));
    let hot_cpu = "model: {arch: qwen3moe}\nworker: {devices: [cpu]}\nexperts:\n  servers: {a: {numa: 0}}\n  \
                   split: intermediate\n  hot_on_gpu: {per_layer: 2}\nrules:\n  - {match: '.*', place: cpu}\n";
    assert!(err(hot_cpu).contains("cuda"), "{}", err(hot_cpu));
}

#[test]
fn resolution_problems() {
    let m = fixture();
    // No catch-all: norms and embeddings are unplaced.
    let p = Plan::parse("p.yaml", &GOOD.replace("  - {match: '.*', place: cpu}\n", "")).unwrap();
    let r = resolve(&p, &m, &Limits::default());
    assert!(
        matches!(&r.problems[..], [Problem::Unplaced { names }] if names.contains(&"lm_head.weight".to_string()))
    );
    // Missing layers in a by_layer split (the fixture has MoE layers 0 and 1).
    let p = Plan::parse(
        "p.yaml",
        &GOOD.replace(
            "split: by_expert\n  assign: round_robin",
            "split: by_layer\n  layers: {numa0: \"0\", numa1: \"5\"}",
        ),
    )
    .unwrap();
    let r = resolve(&p, &m, &Limits::default());
    assert!(
        r.problems.contains(&Problem::LayersNotCovered { layers: vec![1] }),
        "{:?}",
        r.problems
    );
    assert!(r.problems.iter().any(|p| matches!(p, Problem::OutOfRange { index: 5, .. })));
    // Experts not covered by explicit ranges.
    let p = Plan::parse(
        "p.yaml",
        &GOOD.replace("assign: round_robin", "assign: {numa0: \"0\", numa1: \"1-2\"}"),
    )
    .unwrap();
    let r = resolve(&p, &m, &Limits::default());
    assert!(
        r.problems.contains(&Problem::ExpertsNotCovered { experts: vec![3] }),
        "{:?}",
        r.problems
    );
    // A non-expert sent to the expert tier.
    let any =
        Plan::parse("p.yaml", &GOOD.replace("'\\.experts\\.\\d+\\.', kind: experts", "'norm'"))
            .unwrap();
    let r = resolve(&any, &m, &Limits::default());
    assert!(r
        .problems
        .iter()
        .any(|p| matches!(p, Problem::NotAnExpert { rule, .. } if rule.contains("line 8"))));
    // Memory limits.
    let good = Plan::parse("p.yaml", GOOD).unwrap();
    let r = resolve(&good, &m, &Limits { gpu: Some(1), host: Some(GIB) });
    assert!(r
        .problems
        .iter()
        .any(|p| matches!(p, Problem::OverLimit { what, .. } if what == "device cuda:0")));
    // Wrong architecture.
    let other = Plan::parse("p.yaml", &GOOD.replace("qwen3moe", "mixtral")).unwrap();
    let r = resolve(&other, &m, &Limits::default());
    assert!(r.problems.iter().any(|p| matches!(p, Problem::ArchMismatch { .. })));
}

#[test]
fn intermediate_split_divides_bytes_and_replicas_double_them() {
    let m = fixture();
    let expert_bytes: u64 = m.tensors.iter().filter(|t| t.expert.is_some()).map(|t| t.bytes).sum();
    let p = Plan::parse(
        "p.yaml",
        &GOOD.replace(
            "split: by_expert\n  assign: round_robin",
            "split: intermediate\n  slices: {numa0: 3, numa1: 1}",
        ),
    )
    .unwrap();
    let r = resolve(&p, &m, &Limits::default());
    assert!(r.ok());
    assert_eq!(r.servers[0].bytes + r.servers[1].bytes, expert_bytes);
    assert_eq!(r.servers[0].rows, Some(24));
    assert_eq!(r.servers[0].bytes, expert_bytes * 3 / 4);
    let p =
        Plan::parse("p.yaml", &GOOD.replace("{numa: 1}", "{numa: 1, replicas: [numa0]}")).unwrap();
    let r = resolve(&p, &m, &Limits::default());
    assert_eq!(r.servers[0].replica_bytes, r.servers[1].bytes);
    assert_eq!(r.servers[0].bytes + r.servers[1].bytes, expert_bytes);
}

#[test]
fn broken_replicas_name_file_line_and_server() {
    // Replica of an unknown server.
    let e = err(&GOOD.replace("{numa: 0}", "{numa: 0, replicas: [numa9]}"));
    assert!(
        e.starts_with("p.yaml:4:")
            && e.contains("experts.servers.numa0.replicas")
            && e.contains("unknown server `numa9`")
            && e.contains("numa0, numa1"),
        "{e}"
    );
    // A server as its own replica.
    let e = err(&GOOD.replace("{numa: 1}", "{numa: 1, replicas: [numa1]}"));
    assert!(
        e.starts_with("p.yaml:4:")
            && e.contains("experts.servers.numa1.replicas")
            && e.contains("its own replica"),
        "{e}"
    );
    // The same replica twice.
    let e = err(&GOOD.replace("{numa: 1}", "{numa: 1, replicas: [numa0, numa0]}"));
    assert!(e.contains("experts.servers.numa1.replicas") && e.contains("twice"), "{e}");
    // Replicas of intermediate slices: refused, naming the split.
    let sliced = GOOD
        .replace("split: by_expert\n  assign: round_robin", "split: intermediate")
        .replace("{numa: 1}", "{numa: 1, replicas: [numa0]}");
    let e = err(&sliced);
    assert!(
        e.starts_with("p.yaml:4:")
            && e.contains("experts.servers.numa1.replicas")
            && e.contains("split: intermediate"),
        "{e}"
    );
    // Mutual replicas with a by_layer split are fine, and every server's replica bytes are
    // the other's own bytes.
    let mutual = GOOD
        .replace(
            "split: by_expert\n  assign: round_robin",
            "split: by_layer\n  layers: {numa0: \"0\", numa1: \"1\"}",
        )
        .replace("{numa: 0}", "{numa: 0, replicas: [numa1]}")
        .replace("{numa: 1}", "{numa: 1, replicas: [numa0]}");
    let p = Plan::parse("p.yaml", &mutual).unwrap();
    let tier = p.experts.as_ref().unwrap();
    assert_eq!(
        (tier.servers[0].replicas.clone(), tier.servers[1].replicas.clone()),
        (vec![1], vec![0])
    );
    let m = fixture();
    let r = resolve(&p, &m, &Limits::default());
    assert!(r.ok(), "{}", r.render(true));
    assert_eq!(r.servers[0].replica_bytes, r.servers[1].bytes);
    assert_eq!(r.servers[1].replica_bytes, r.servers[0].bytes);
}
