//! Process helpers shared by the harnesses (tests/support, the conformance
//! suite and the benchmarks), included with `#[path]`.

use std::io::{BufRead, BufReader, Read};

/// Pids of the processes whose environment holds exactly `var=value`: every
/// process a harness launched for one cluster, even one that escaped its
/// parent. A zombie has an empty environment, so it is not listed.
pub fn with_env(var: &str, value: &str) -> Vec<u32> {
    let needle = format!("{var}={value}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|var| var == needle.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

/// Reads `pipe` on a thread of its own, so it never fills, handing each
/// line (always newline-terminated, lossily UTF-8) to `on_line`; calls
/// `on_eof` once the pipe is closed.
pub fn pump_lines(
    pipe: impl Read + Send + 'static,
    mut on_line: impl FnMut(&str) + Send + 'static,
    on_eof: impl FnOnce() + Send + 'static,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let mut text = String::from_utf8_lossy(&line).into_owned();
                    if !text.ends_with('\n') {
                        text.push('\n');
                    }
                    on_line(&text);
                }
            }
        }
        on_eof();
    });
}
