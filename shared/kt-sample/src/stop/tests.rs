//! StopChecker against every split of the text into pieces and a plain reference.

use super::*;
use crate::Rng;

fn checker(stops: &[&str]) -> StopChecker {
    StopChecker::new(stops.iter().map(|s| s.to_string()).collect(), vec![])
}

/// Streams `pieces` and returns everything emitted (including `finish()`) and the stop.
fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<StopReason>) {
    let mut c = checker(stops);
    let mut out = String::new();
    let mut stop = None;
    for p in pieces {
        let o = c.push_text(p);
        out.push_str(&o.text);
        if o.stop.is_some() {
            stop = o.stop;
            break;
        }
    }
    out.push_str(&c.finish());
    (out, stop)
}

/// Plain reference: the occurrence that ends first (ties: starts first) over the whole text.
fn reference(text: &str, stops: &[&str]) -> (String, Option<StopReason>) {
    let mut best: Option<(usize, usize, &str)> = None;
    for s in stops {
        for start in 0..text.len() {
            if text.is_char_boundary(start) && text[start..].starts_with(s) {
                let key = (start + s.len(), start, *s);
                if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                    best = Some(key);
                }
            }
        }
    }
    match best {
        Some((_, start, s)) => {
            (text[..start].to_owned(), Some(StopReason::StopString(s.to_owned())))
        }
        None => (text.to_owned(), None),
    }
}

fn boundaries(text: &str) -> Vec<usize> {
    (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect()
}

/// Every split of `text` into three pieces at char boundaries (empty pieces included).
fn check_all_three_way_splits(text: &str, stops: &[&str]) {
    let want = reference(text, stops);
    let b = boundaries(text);
    for &i in &b {
        for &j in b.iter().filter(|&&j| j >= i) {
            let got = run(stops, &[&text[..i], &text[i..j], &text[j..]]);
            assert_eq!(got, want, "text {text:?} stops {stops:?} split at {i}, {j}");
        }
    }
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(run(stops, &pieces), want, "char by char: {text:?}");
}

#[test]
fn stop_string_split_at_every_position() {
    check_all_three_way_splits("hello STOP world", &["STOP"]);
    let (text, stop) = run(&["STOP"], &["hello ST", "O", "P world"]);
    assert_eq!(text, "hello ");
    assert_eq!(stop, Some(StopReason::StopString("STOP".into())));
}

#[test]
fn overlapping_prefixes() {
    assert_eq!(reference("aababab", &["abab"]).0, "a");
    check_all_three_way_splits("aababab", &["abab"]);
    check_all_three_way_splits("aaab", &["aab"]);
    check_all_three_way_splits("abcabcabd", &["abcabd"]);
}

#[test]
fn multiple_stop_strings() {
    check_all_three_way_splits("hello world xyz", &["xyz", "lo w"]);
    assert_eq!(run(&["xyz", "lo w"], &["hello world xyz"]).0, "hel");
    // The occurrence that completes first wins, whatever the split.
    check_all_three_way_splits("abcdefg", &["abcdef", "cd"]);
    assert_eq!(run(&["abcdef", "cd"], &["abcdefg"]).0, "ab");
    // Same end: the longer (earlier start) wins.
    check_all_three_way_splits("xab", &["b", "ab"]);
    assert_eq!(run(&["b", "ab"], &["xab"]).0, "x");
}

#[test]
fn unicode_stop_strings() {
    check_all_three_way_splits("こんにちは日本語です", &["日本"]);
    assert_eq!(run(&["日本"], &["こんにちは日", "本語"]).0, "こんにちは");
    // A held-back "日" that turns out not to start the stop string is released.
    check_all_three_way_splits("日曜日本", &["日本"]);
    assert_eq!(run(&["日本"], &["日曜日本"]).0, "日曜");
    check_all_three_way_splits("café ☕ </s> more", &["</s>", "☕☕"]);
}

#[test]
fn no_stop_emits_everything_after_finish() {
    let mut c = checker(&["abd", "zz"]);
    let mut out = String::new();
    let o = c.push_text("xxab");
    assert_eq!(o, StopOutput { text: "xx".into(), stop: None }, "'ab' held back");
    out.push_str(&o.text);
    let o = c.push_text("cab");
    assert_eq!(o.text, "abc");
    out.push_str(&o.text);
    let o = c.push_text("z");
    assert_eq!(o.text, "ab", "'z' may start 'zz'");
    out.push_str(&o.text);
    assert_eq!(c.finish(), "z");
    out.push('z');
    assert_eq!(out, "xxabcabz");
    check_all_three_way_splits("abcabz", &["abd", "zz"]);
}

#[test]
fn no_stop_strings_emits_immediately() {
    let mut c = checker(&[]);
    assert_eq!(c.push_text("abc").text, "abc");
    assert_eq!(c.finish(), "");
}

#[test]
fn after_a_stop_pushes_emit_nothing() {
    let mut c = checker(&["x"]);
    let o = c.push_text("abxcd");
    assert_eq!(o.text, "ab");
    let again = c.push_text("more");
    assert_eq!(again.text, "");
    assert_eq!(again.stop, Some(StopReason::StopString("x".into())));
    assert_eq!(c.finish(), "");
    assert_eq!(c.stopped(), Some(&StopReason::StopString("x".into())));
}

#[test]
fn stop_token_ids_flush_held_text_and_drop_their_own() {
    let mut c = StopChecker::new(vec!["STOP".into()], vec![7]);
    c.add_stop_token_ids(&[2]);
    assert_eq!(c.push_token(10, "ok ST").text, "ok ");
    let o = c.push_token(2, "</s>");
    assert_eq!(o.text, "ST");
    assert_eq!(o.stop, Some(StopReason::TokenId(2)));
    assert_eq!(c.push_token(3, "x").text, "");
}

#[test]
fn max_tokens_accounting() {
    let params = SamplingParams {
        max_tokens: Some(3),
        stop: vec!["abc".into()],
        ..SamplingParams::default()
    };
    let mut c = StopChecker::from_params(&params);
    assert_eq!(c.tokens_left(), Some(3));
    assert_eq!(c.push_token(1, "x").stop, None);
    assert_eq!(c.push_token(1, "y").stop, None);
    assert_eq!(c.tokens_left(), Some(1));
    let o = c.push_token(1, "ab");
    assert_eq!(o.text, "ab", "held prefix flushed at the budget");
    assert_eq!(o.stop, Some(StopReason::MaxTokens));
    assert_eq!(c.tokens(), 3);
    assert_eq!(c.tokens_left(), Some(0));
    // A stop string completed by the last token wins over the budget.
    let mut c = StopChecker::from_params(&params);
    c.push_token(1, "a");
    c.push_token(1, "b");
    let o = c.push_token(1, "c");
    assert_eq!(o.stop, Some(StopReason::StopString("abc".into())));
    assert_eq!(o.text, "");
}

#[test]
fn random_texts_and_splits_match_reference() {
    let alphabet = ['a', 'b', 'c', 'é', '日'];
    let mut r = Rng::new(2024);
    let pick = |n: u64, r: &mut Rng| (r.next_u64() % n) as usize;
    for case in 0..3000 {
        let len = pick(30, &mut r);
        let text: String = (0..len).map(|_| alphabet[pick(5, &mut r)]).collect();
        let n_stops = 1 + pick(3, &mut r);
        let stops: Vec<String> = (0..n_stops)
            .map(|_| {
                let l = 1 + pick(4, &mut r);
                (0..l).map(|_| alphabet[pick(5, &mut r)]).collect()
            })
            .collect();
        let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
        let b = boundaries(&text);
        let mut cuts: Vec<usize> =
            (0..pick(6, &mut r)).map(|_| b[pick(b.len() as u64, &mut r)]).collect();
        cuts.push(0);
        cuts.push(text.len());
        cuts.sort_unstable();
        let pieces: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
        let want = reference(&text, &stops);
        assert_eq!(run(&stops, &pieces), want, "case {case}: {text:?} {stops:?} {pieces:?}");
    }
}
