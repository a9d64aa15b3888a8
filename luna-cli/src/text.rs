//! Text arguments: `@FILE` reads a file, `-` reads stdin, anything else is the text itself.
//!
//! Stdin can be read once per run, so a [`TextSource`] refuses a second `-`.

use std::io::Read;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot read {what} from file '{path}': {err}")]
    File { what: String, path: String, err: std::io::Error },
    #[error("cannot read {what} from stdin: {err}")]
    Stdin { what: String, err: std::io::Error },
    #[error("{what} cannot be read from stdin: stdin was already used for {first}")]
    StdinTwice { what: String, first: String },
}

/// Resolves text arguments against the file system and one stdin.
pub struct TextSource<R> {
    stdin: Option<R>,
    used_by: Option<String>,
}

impl TextSource<std::io::Stdin> {
    pub fn stdin() -> Self {
        TextSource::new(std::io::stdin())
    }
}

impl<R: Read> TextSource<R> {
    pub fn new(stdin: R) -> Self {
        TextSource { stdin: Some(stdin), used_by: None }
    }

    /// `what` names the flag in errors, e.g. `--postscript`.
    pub fn read(&mut self, what: &str, arg: &str) -> Result<String, TextError> {
        if arg == "-" {
            let Some(mut r) = self.stdin.take() else {
                return Err(TextError::StdinTwice {
                    what: what.into(),
                    first: self.used_by.clone().unwrap_or_default(),
                });
            };
            self.used_by = Some(what.into());
            let mut s = String::new();
            r.read_to_string(&mut s).map_err(|err| TextError::Stdin { what: what.into(), err })?;
            return Ok(s);
        }
        if let Some(path) = arg.strip_prefix('@') {
            return std::fs::read_to_string(Path::new(path)).map_err(|err| TextError::File {
                what: what.into(),
                path: path.into(),
                err,
            });
        }
        Ok(arg.to_string())
    }

    /// Like [`read`](Self::read), for one-line values (passwords, communities): a file's or
    /// stdin's trailing newline is not part of the value.
    pub fn read_line(&mut self, what: &str, arg: &str) -> Result<String, TextError> {
        let s = self.read(what, arg)?;
        if arg == "-" || arg.starts_with('@') {
            return Ok(s.trim_end_matches(['\n', '\r']).to_string());
        }
        Ok(s)
    }

    pub fn read_opt(&mut self, what: &str, arg: Option<&String>) -> Result<Option<String>, TextError> {
        arg.map(|a| self.read(what, a)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_file_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("post.sh");
        std::fs::write(&path, "#!/bin/sh\necho hi\n").unwrap();
        let mut src = TextSource::new(&b"from stdin\n"[..]);
        assert_eq!(src.read("--comment", "plain text").unwrap(), "plain text");
        assert_eq!(src.read("--postscript", &format!("@{}", path.display())).unwrap(), "#!/bin/sh\necho hi\n");
        assert_eq!(src.read("--prescript", "-").unwrap(), "from stdin\n");
    }

    #[test]
    fn stdin_only_once() {
        let mut src = TextSource::new(&b"x"[..]);
        src.read("--prescript", "-").unwrap();
        let e = src.read("--postscript", "-").unwrap_err().to_string();
        assert_eq!(e, "--postscript cannot be read from stdin: stdin was already used for --prescript");
    }

    #[test]
    fn missing_file_names_it() {
        let mut src = TextSource::new(&b""[..]);
        let e = src.read("--postscript", "@/nonexistent/luna-post.sh").unwrap_err().to_string();
        assert!(e.starts_with("cannot read --postscript from file '/nonexistent/luna-post.sh': "), "{e}");
    }

    #[test]
    fn one_line_values_lose_the_newline() {
        let mut src = TextSource::new(&b"s3cret\n"[..]);
        assert_eq!(src.read_line("--password", "-").unwrap(), "s3cret");
        // A literal keeps what the admin typed.
        assert_eq!(src.read_line("--password", "a b\n").unwrap(), "a b\n");
    }
}
