//! `kt chat` in a real pseudo-terminal: two turns, Ctrl-C stopping an answer without quitting,
//! and `/exit`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use expectrl::{ControlCode, Eof, Session};

fn kt_chat(extra: &str) -> Session {
    let cmd = format!("{} chat --temperature 0 {extra}", env!("CARGO_BIN_EXE_kt"));
    let mut s = expectrl::spawn(cmd).expect("spawn kt chat");
    s.set_expect_timeout(Some(Duration::from_secs(60)));
    s
}

#[test]
fn two_turns_then_exit() {
    let mut s = kt_chat("--max-new-tokens 8");
    s.expect("> ").unwrap();
    s.send_line("Hello there").unwrap();
    // the answer streams, then the next prompt comes
    s.expect("> ").unwrap();
    s.send_line("And again").unwrap();
    s.expect("> ").unwrap();
    s.send_line("/clear").unwrap();
    s.expect("(conversation cleared)").unwrap();
    s.send_line("/exit").unwrap();
    s.expect(Eof).unwrap();
}

#[test]
fn ctrl_c_stops_the_answer_not_the_program() {
    // An answer that would run for a very long time unless stopped.
    let mut s = kt_chat("--max-new-tokens 1000000 --ignore-eos");
    s.expect("> ").unwrap();
    s.send_line("Tell me everything").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    s.send([ControlCode::EndOfText as u8]).unwrap(); // Ctrl-C
    s.expect("(stopped)").unwrap();
    s.expect("> ").unwrap();
    // still alive: another turn works
    s.send_line("/exit").unwrap();
    s.expect(Eof).unwrap();
}
