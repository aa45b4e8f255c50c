//! The NodeAgent API's bearer token, as both ends read it: the node plugin
//! checks `authorization: Bearer <token>` on every call and the controller
//! sends it. Part of the API's contract, like the generated code, so one
//! parser serves both.

use std::path::{Path, PathBuf};

/// What goes before the token in the `authorization` header.
pub const BEARER_PREFIX: &str = "Bearer ";

/// Why bytes are not a usable token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("is empty")]
    Empty,
    #[error("holds characters not allowed in an HTTP header")]
    NotAHeaderValue,
}

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading the agent token file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent token file {path} {problem}")]
    Invalid {
        path: PathBuf,
        problem: TokenProblem,
    },
}

/// The token in `bytes`, without surrounding whitespace (a Secret created
/// with `echo` ends in a newline): printable ASCII, nothing else.
pub fn parse_token(bytes: &[u8]) -> Result<&[u8], TokenProblem> {
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(TokenProblem::Empty);
    }
    if !token.iter().all(u8::is_ascii_graphic) {
        return Err(TokenProblem::NotAHeaderValue);
    }
    Ok(token)
}

/// The token in the file `path` ([`parse_token`]).
pub fn read_token_file(path: &Path) -> Result<Vec<u8>, TokenFileError> {
    let bytes = std::fs::read(path).map_err(|source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_token(&bytes)
        .map(<[u8]>::to_vec)
        .map_err(|problem| TokenFileError::Invalid {
            path: path.to_owned(),
            problem,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_printable_ascii() {
        assert_eq!(parse_token(b"  abc-123\n"), Ok(&b"abc-123"[..]));
        assert_eq!(parse_token(b" \n"), Err(TokenProblem::Empty));
        assert_eq!(parse_token(b"a b"), Err(TokenProblem::NotAHeaderValue));
        assert_eq!(
            parse_token("é".as_bytes()),
            Err(TokenProblem::NotAHeaderValue)
        );
    }
}
