//! Each transform against a plain reference written here, and the whole chain against the
//! brute-force distribution by the empirical frequencies of seeded draws.

use super::*;

/// Random logits from a fixed seed; `quantized` makes many ties.
fn random_logits(seed: u64, n: usize, quantized: bool) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| {
            let x = r.next_f64() * 8.0 - 4.0;
            if quantized {
                x.round() as f32
            } else {
                x as f32
            }
        })
        .collect()
}

fn ids(c: &[Candidate]) -> Vec<u32> {
    let mut v: Vec<u32> = c.iter().map(|c| c.id).collect();
    v.sort_unstable();
    v
}

/// Plain softmax over (id, logit) pairs in f64.
fn ref_probs(kept: &[(u32, f32)]) -> Vec<f64> {
    let max = kept.iter().map(|k| k.1 as f64).fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = kept.iter().map(|k| (k.1 as f64 - max).exp()).collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|x| x / s).collect()
}

/// Sort by logit descending, ties to the lower id.
fn ref_sort(kept: &mut [(u32, f32)]) {
    kept.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
}

fn ref_top_k(mut kept: Vec<(u32, f32)>, k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return kept;
    }
    ref_sort(&mut kept);
    kept.truncate(k);
    kept
}

fn ref_top_p(mut kept: Vec<(u32, f32)>, p: f32) -> Vec<(u32, f32)> {
    if p >= 1.0 {
        return kept;
    }
    ref_sort(&mut kept);
    let probs = ref_probs(&kept);
    let mut sum = 0.0;
    for (i, q) in probs.iter().enumerate() {
        sum += q;
        if sum >= p as f64 {
            kept.truncate(i + 1);
            break;
        }
    }
    kept
}

fn ref_min_p(kept: Vec<(u32, f32)>, m: f32) -> Vec<(u32, f32)> {
    if m <= 0.0 {
        return kept;
    }
    let probs = ref_probs(&kept);
    let pmax = probs.iter().cloned().fold(0.0, f64::max);
    kept.into_iter().zip(probs).filter(|(_, q)| *q >= m as f64 * pmax).map(|(k, _)| k).collect()
}

/// The distribution over the whole vocabulary that the sampler should draw from.
fn ref_distribution(logits: &[f32], p: &SamplingParams, history: &[u32]) -> Vec<f64> {
    let v = logits.len();
    let mut l = logits.to_vec();
    let window = match p.penalty_window {
        None => history,
        Some(n) => &history[history.len().saturating_sub(n)..],
    };
    for (id, x) in l.iter_mut().enumerate() {
        let count = window.iter().filter(|&&h| h as usize == id).count();
        if count > 0 {
            *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
            *x -= p.presence_penalty + count as f32 * p.frequency_penalty;
        }
    }
    for (&id, &b) in &p.logit_bias {
        l[id as usize] = if b <= -100.0 { f32::NEG_INFINITY } else { l[id as usize] + b };
    }
    let mut out = vec![0.0; v];
    if p.temperature == 0.0 {
        let mut best = 0;
        for i in 0..v {
            if l[i] > l[best] {
                best = i;
            }
        }
        out[best] = 1.0;
        return out;
    }
    let kept: Vec<(u32, f32)> = (0..v)
        .filter(|&i| l[i] != f32::NEG_INFINITY)
        .map(|i| (i as u32, l[i] / p.temperature))
        .collect();
    let kept = ref_min_p(ref_top_p(ref_top_k(kept, p.top_k), p.top_p), p.min_p);
    for (k, q) in kept.iter().zip(ref_probs(&kept)) {
        out[k.0 as usize] = q;
    }
    out
}

/// Draws `n` times with `pick` (history unchanged) and checks every frequency against
/// `expected` within 5 standard deviations; ids with probability 0 must never come out.
fn assert_frequencies(sampler: &mut Sampler, logits: &[f32], expected: &[f64], n: usize) {
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[sampler.pick(logits).unwrap() as usize] += 1;
    }
    for (id, (&c, &q)) in counts.iter().zip(expected).enumerate() {
        if q == 0.0 {
            assert_eq!(c, 0, "id {id} filtered out but drawn {c} times");
            continue;
        }
        let mean = n as f64 * q;
        let sd = (n as f64 * q * (1.0 - q)).sqrt();
        assert!(
            (c as f64 - mean).abs() <= 5.0 * sd + 1.0,
            "id {id}: {c} draws, expected {mean:.1} ± {sd:.1}; counts {counts:?} expected {expected:?}"
        );
    }
}

#[test]
fn penalties_match_hand_computed_values() {
    let mut l = vec![2.0, -1.0, 0.5, 3.0, 0.0];
    apply_penalties(&mut l, &[0, 1, 0, 2, 99], 2.0, 0.5, 0.25);
    // id 0 seen twice: 2/2 - 0.5 - 2*0.25; id 1: -1*2 - 0.75; id 2: 0.5/2 - 0.75; 99 ignored.
    assert_eq!(l, vec![0.0, -2.75, -0.5, 3.0, 0.0]);
}

#[test]
fn repetition_penalty_alone_is_hf_style() {
    let mut l = vec![4.0, -4.0, 1.0];
    apply_penalties(&mut l, &[0, 1, 0, 1], 1.3, 0.0, 0.0);
    // Applied once per distinct id, whatever the count.
    assert_eq!(l, vec![4.0 / 1.3, -4.0 * 1.3, 1.0]);
}

#[test]
fn penalties_against_reference_on_random_inputs() {
    for seed in 0..50 {
        let logits = random_logits(seed, 32, false);
        let mut r = Rng::new(seed + 1000);
        let hist: Vec<u32> = (0..40).map(|_| (r.next_u64() % 40) as u32).collect();
        let mut got = logits.clone();
        apply_penalties(&mut got, &hist, 1.1, 0.3, 0.2);
        for id in 0..32u32 {
            let count = hist.iter().filter(|&&h| h == id).count();
            let x = logits[id as usize];
            let want = if count == 0 {
                x
            } else {
                (if x > 0.0 { x / 1.1 } else { x * 1.1 }) - (0.3 + count as f32 * 0.2)
            };
            assert_eq!(got[id as usize], want, "seed {seed} id {id}");
        }
    }
}

#[test]
fn penalty_window_limits_what_is_penalised() {
    let logits = [5.0, 4.0, 3.0];
    let params = |window| SamplingParams {
        temperature: 0.0,
        repetition_penalty: 10.0,
        penalty_window: window,
        ..SamplingParams::default()
    };
    // History [0, 0, 1]: with all of it, 0 -> 0.5 and 1 -> 0.4, so 2 wins; a window of 1
    // penalises only 1, so 0 wins; window 0 penalises nothing.
    let mut s = Sampler::new(params(None)).unwrap();
    s.add_prompt(&[0, 0, 1]);
    assert_eq!(s.pick(&logits).unwrap(), 2, "0 and 1 penalised, 2 not");
    let mut s = Sampler::new(params(Some(1))).unwrap();
    s.add_prompt(&[0, 0, 1]);
    assert_eq!(s.pick(&logits).unwrap(), 0, "only the last id (1) penalised");
    let mut s = Sampler::new(params(Some(0))).unwrap();
    s.add_prompt(&[0, 0, 1]);
    assert_eq!(s.pick(&logits).unwrap(), 0, "window 0 disables penalties");
}

#[test]
fn logit_bias_adds_and_bans() {
    let mut l = vec![1.0, 2.0, 3.0, 4.0];
    let bias: BTreeMap<u32, f32> =
        [(0, 0.5), (2, -100.0), (3, f32::NEG_INFINITY)].into_iter().collect();
    apply_logit_bias(&mut l, &bias).unwrap();
    assert_eq!(l, vec![1.5, 2.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
    let out: BTreeMap<u32, f32> = [(4, 1.0)].into_iter().collect();
    assert_eq!(
        apply_logit_bias(&mut l, &out),
        Err(SampleError::TokenOutOfRange { id: 4, vocab: 4 })
    );
}

#[test]
fn banned_tokens_are_never_drawn() {
    let logits = [3.0, 3.0, 0.0, -1.0];
    let params = SamplingParams {
        logit_bias: [(0, -100.0), (1, f32::NEG_INFINITY)].into_iter().collect(),
        seed: Some(5),
        ..SamplingParams::default()
    };
    let mut s = Sampler::new(params).unwrap();
    for _ in 0..2000 {
        assert!(s.pick(&logits).unwrap() >= 2);
    }
}

#[test]
fn greedy_is_argmax_with_ties_to_lowest_id() {
    assert_eq!(greedy(&[1.0, 3.0, 3.0, 2.0]), Some(1));
    assert_eq!(greedy(&[f32::NEG_INFINITY, -5.0]), Some(1));
    assert_eq!(greedy(&[f32::NEG_INFINITY; 3]), None);
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    for _ in 0..10 {
        assert_eq!(s.pick(&[0.5, 7.0, 7.0, -1.0]).unwrap(), 1);
    }
    // top_k = 1 is greedy too, whatever the temperature.
    let mut s =
        Sampler::new(SamplingParams { top_k: 1, temperature: 5.0, ..SamplingParams::default() })
            .unwrap();
    assert_eq!(s.pick(&[0.5, 7.0, 7.0, -1.0]).unwrap(), 1);
}

#[test]
fn top_k_kept_set_matches_reference_with_ties() {
    for seed in 0..200 {
        let logits = random_logits(seed, 24, true);
        for k in [0, 1, 2, 5, 23, 24, 30] {
            let mut c = candidates(&logits);
            top_k(&mut c, k);
            let kept: Vec<(u32, f32)> =
                logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            let want: Vec<u32> = {
                let mut v: Vec<u32> = ref_top_k(kept, k).iter().map(|k| k.0).collect();
                v.sort_unstable();
                v
            };
            assert_eq!(ids(&c), want, "seed {seed} k {k}");
        }
    }
}

#[test]
fn top_p_kept_set_matches_reference() {
    for seed in 0..200 {
        let logits = random_logits(seed, 24, false);
        for p in [0.05, 0.3, 0.5, 0.8, 0.95, 0.999, 1.0] {
            let mut c = candidates(&logits);
            top_p(&mut c, p);
            let kept: Vec<(u32, f32)> =
                logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            let mut want: Vec<u32> = ref_top_p(kept, p).iter().map(|k| k.0).collect();
            want.sort_unstable();
            assert_eq!(ids(&c), want, "seed {seed} p {p}");
            assert!(!c.is_empty());
        }
    }
}

#[test]
fn top_p_large_vocab_partial_sort_matches_reference() {
    for seed in 0..4 {
        let logits = random_logits(100 + seed, 5000, false);
        // Small p ends inside the partially sorted prefix, large p needs the full sort.
        for p in [0.1, 0.5, 0.9, 0.999] {
            let mut c = candidates(&logits);
            top_p(&mut c, p);
            let kept: Vec<(u32, f32)> =
                logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            let want: Vec<u32> = ref_top_p(kept, p).iter().map(|k| k.0).collect();
            let got: Vec<u32> = c.iter().map(|c| c.id).collect();
            assert_eq!(got, want, "seed {seed} p {p}: sorted, same set");
        }
    }
}

#[test]
fn min_p_kept_set_matches_reference() {
    for seed in 0..200 {
        let logits = random_logits(seed, 24, false);
        for m in [0.0, 0.01, 0.1, 0.3, 0.7, 1.0] {
            let mut c = candidates(&logits);
            min_p(&mut c, m);
            let kept: Vec<(u32, f32)> =
                logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            let mut want: Vec<u32> = ref_min_p(kept, m).iter().map(|k| k.0).collect();
            want.sort_unstable();
            assert_eq!(ids(&c), want, "seed {seed} min_p {m}");
            assert!(!c.is_empty());
        }
    }
}

#[test]
fn softmax_sums_to_one() {
    let c = candidates(&random_logits(3, 100, false));
    let s: f64 = softmax(&c).iter().sum();
    assert!((s - 1.0).abs() < 1e-12);
}

#[test]
fn plain_softmax_frequencies() {
    let logits = [1.0, 0.0, -1.0, 2.0, 0.5, f32::NEG_INFINITY];
    let params = SamplingParams { seed: Some(1), ..SamplingParams::default() };
    let expected = ref_distribution(&logits, &params, &[]);
    assert_frequencies(&mut Sampler::new(params).unwrap(), &logits, &expected, 20_000);
}

#[test]
fn temperature_frequencies() {
    let logits = random_logits(11, 8, false);
    for t in [0.3, 0.7, 1.8] {
        let params = SamplingParams { temperature: t, seed: Some(2), ..SamplingParams::default() };
        let expected = ref_distribution(&logits, &params, &[]);
        assert_frequencies(&mut Sampler::new(params).unwrap(), &logits, &expected, 20_000);
    }
}

#[test]
fn each_filter_frequencies() {
    let logits = random_logits(12, 10, false);
    let d = SamplingParams::default;
    for params in [
        SamplingParams { top_k: 4, seed: Some(3), ..d() },
        SamplingParams { top_p: 0.7, seed: Some(4), ..d() },
        SamplingParams { min_p: 0.2, seed: Some(5), ..d() },
    ] {
        let expected = ref_distribution(&logits, &params, &[]);
        assert!(
            expected.iter().filter(|&&q| q == 0.0).count() > 0,
            "filter should cut: {params:?}"
        );
        assert_frequencies(&mut Sampler::new(params).unwrap(), &logits, &expected, 20_000);
    }
}

#[test]
fn full_chain_frequencies() {
    let logits = random_logits(13, 12, false);
    let history = [1, 1, 4, 7, 7, 7, 2];
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 9,
        top_p: 0.9,
        min_p: 0.05,
        repetition_penalty: 1.2,
        presence_penalty: 0.2,
        frequency_penalty: 0.1,
        penalty_window: Some(6),
        logit_bias: [(0, 0.7), (3, -100.0)].into_iter().collect(),
        seed: Some(6),
        ..SamplingParams::default()
    };
    let expected = ref_distribution(&logits, &params, &history);
    let mut s = Sampler::new(params).unwrap();
    s.add_prompt(&history);
    assert_frequencies(&mut s, &logits, &expected, 20_000);
}

#[test]
fn same_seed_same_tokens_different_seed_differs() {
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.2,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed: Some(seed),
            ..SamplingParams::default()
        })
        .unwrap();
        s.add_prompt(&[1, 2, 3]);
        (0..200)
            .map(|step| s.sample(&random_logits(step, 64, false)).unwrap())
            .collect::<Vec<u32>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn sample_records_history_pick_does_not() {
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    s.add_prompt(&[9, 9]);
    let id = s.pick(&[0.0, 1.0]).unwrap();
    assert_eq!(s.history(), &[9, 9]);
    assert_eq!(s.sample(&[0.0, 1.0]).unwrap(), id);
    assert_eq!(s.history(), &[9, 9, 1]);
}

#[test]
fn bad_logits_and_all_banned_are_errors() {
    let mut s =
        Sampler::new(SamplingParams { seed: Some(1), ..SamplingParams::default() }).unwrap();
    assert_eq!(s.pick(&[]), Err(SampleError::EmptyLogits));
    assert!(matches!(s.pick(&[0.0, f32::NAN]), Err(SampleError::NonFiniteLogit { id: 1, .. })));
    assert!(matches!(s.pick(&[f32::INFINITY]), Err(SampleError::NonFiniteLogit { id: 0, .. })));
    assert_eq!(s.pick(&[f32::NEG_INFINITY; 4]), Err(SampleError::AllTokensBanned));
    let mut g = Sampler::new(SamplingParams::greedy()).unwrap();
    assert_eq!(g.pick(&[f32::NEG_INFINITY; 4]), Err(SampleError::AllTokensBanned));
    assert!(matches!(
        Sampler::new(SamplingParams { top_p: 0.0, ..SamplingParams::default() }),
        Err(SampleError::InvalidParam { name: "top_p", .. })
    ));
}
