//! The README's operator cookbook, read from README.md so that the tests run
//! exactly the commands people copy.
//!
//! Between `<!-- cookbook:begin -->` and `<!-- cookbook:end -->`, every
//! command the tests run is a fenced `sh` block right after an HTML comment
//! naming it, e.g. `<!-- cookbook:inject-apps -->`. Blocks without such a
//! comment are illustration (a unit file, a Kubernetes probe) and are not
//! run. A named block may use only the variables in [`VARIABLES`], which the
//! tests set; everything else in it is run verbatim.

use std::collections::BTreeMap;

/// The environment variables the cookbook's commands use, and the only
/// things a test substitutes.
pub const VARIABLES: &[&str] = &[
    "CLUTCH_ADDR",
    "CLUTCH_TOKEN_FILE",
    "CLUTCH_SOCKET",
    "WORKER_PID",
];

/// The README the tests read.
const README: &str = include_str!("../../README.md");

/// The named commands of the cookbook.
pub struct Cookbook {
    blocks: BTreeMap<String, String>,
}

impl Cookbook {
    /// Reads the cookbook section of README.md; panics, naming the line, on
    /// anything malformed.
    pub fn load() -> Cookbook {
        Self::parse(README).unwrap_or_else(|e| panic!("README.md cookbook: {e}"))
    }

    fn parse(readme: &str) -> Result<Cookbook, String> {
        let begin = "<!-- cookbook:begin -->";
        let end = "<!-- cookbook:end -->";
        let start = readme.find(begin).ok_or("no cookbook:begin marker")?;
        let stop = readme.find(end).ok_or("no cookbook:end marker")?;
        if stop < start {
            return Err("cookbook:end comes before cookbook:begin".into());
        }
        let first_line = readme[..start].lines().count();
        let section = &readme[start + begin.len()..stop];
        let mut blocks = BTreeMap::new();
        let mut lines = section.lines().enumerate();
        while let Some((i, line)) = lines.next() {
            let Some(name) = line
                .trim()
                .strip_prefix("<!-- cookbook:")
                .and_then(|r| r.strip_suffix("-->"))
                .map(str::trim)
            else {
                continue;
            };
            let at = first_line + i;
            let fence = lines
                .by_ref()
                .map(|(_, l)| l)
                .find(|l| !l.trim().is_empty())
                .ok_or(format!("line {at}: {name} is not followed by a block"))?;
            if fence.trim() != "```sh" {
                return Err(format!(
                    "line {at}: {name} must be followed by a ```sh block, found {fence:?}"
                ));
            }
            let mut body = String::new();
            let mut closed = false;
            for (_, l) in lines.by_ref() {
                if l.trim() == "```" {
                    closed = true;
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            if !closed {
                return Err(format!("line {at}: the block of {name} is not closed"));
            }
            for var in variables(&body) {
                if !VARIABLES.contains(&var.as_str()) {
                    return Err(format!(
                        "line {at}: {name} uses ${var}, which the tests do not set (known: {VARIABLES:?})"
                    ));
                }
            }
            if blocks.insert(name.to_owned(), body).is_some() {
                return Err(format!("line {at}: {name} is named twice"));
            }
        }
        Ok(Cookbook { blocks })
    }

    /// The command named `name`, verbatim.
    #[track_caller]
    pub fn command(&self, name: &str) -> &str {
        self.blocks
            .get(name)
            .unwrap_or_else(|| {
                panic!(
                    "README.md has no cookbook command {name:?} (it has {:?})",
                    self.names()
                )
            })
            .as_str()
    }

    /// Every command's name.
    pub fn names(&self) -> Vec<&str> {
        self.blocks.keys().map(String::as_str).collect()
    }

    /// The JSON request body of a command that passes one with `-d '...'`.
    #[track_caller]
    pub fn request_body(&self, name: &str) -> serde_json::Value {
        self.request_body_with(name, &[])
    }

    /// The JSON request body of a command: `-d '...'`, or a `<<EOF`
    /// here-document with these variables filled in, as the shell does.
    #[track_caller]
    pub fn request_body_with(&self, name: &str, vars: &[(&str, String)]) -> serde_json::Value {
        let command = self.command(name);
        let body = if let Some(start) = command.find("-d '") {
            let start = start + 4;
            let len = command[start..]
                .find('\'')
                .unwrap_or_else(|| panic!("{name}: the -d body is not closed: {command}"));
            command[start..start + len].to_owned()
        } else if let Some(start) = command.find("<<EOF\n") {
            let start = start + 6;
            let len = command[start..]
                .find("\nEOF")
                .unwrap_or_else(|| panic!("{name}: the here-document is not closed: {command}"));
            let mut body = command[start..start + len].to_owned();
            for (k, v) in vars {
                body = body.replace(&format!("${k}"), v);
            }
            body
        } else {
            panic!("{name} has no -d '...' or <<EOF body: {command}")
        };
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{name}: the body is not JSON ({e}): {body}"))
    }
}

/// `$NAME` and `${NAME}` references in a shell text.
fn variables(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let braced = bytes.get(i + 1) == Some(&b'{');
            let from = i + 1 + usize::from(braced);
            let len = bytes[from..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                .count();
            if len > 0 && !bytes[from].is_ascii_digit() {
                found.push(text[from..from + len].to_owned());
            }
            i = from + len;
        } else {
            i += 1;
        }
    }
    found
}

#[test]
fn the_parser_reads_named_blocks_and_refuses_unknown_variables() {
    let ok = "x\n<!-- cookbook:begin -->\ntext\n<!-- cookbook:a -->\n```sh\ngrpcurl \"$CLUTCH_ADDR\" list\n```\n```sh\nnot named $HOME\n```\n<!-- cookbook:end -->\n";
    let c = Cookbook::parse(ok).expect("valid");
    assert_eq!(c.names(), vec!["a"]);
    assert_eq!(c.command("a"), "grpcurl \"$CLUTCH_ADDR\" list\n");
    let bad = ok.replace("$CLUTCH_ADDR", "${HOME}");
    assert!(Cookbook::parse(&bad).is_err_and(|e| e.contains("HOME")));
    let twice = ok.replace("text", "<!-- cookbook:a -->\n```sh\nx\n```");
    assert!(Cookbook::parse(&twice).is_err_and(|e| e.contains("twice")));
    assert_eq!(variables("a $(cat \"$X\") ${Y}z $1"), vec!["X", "Y"]);
}
