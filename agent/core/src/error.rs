//! The one error of the pure stages: what is wrong with a commit's files.
//!
//! Every variant names the file and, where it can, the field and the line;
//! none echoes a value from a manifest (it could be a secret).

use std::fmt;

use crate::model::TOPOLOGY_FILE;
use crate::source::PathError;

/// Why a commit could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A value is missing, malformed or refers to something that does not
    /// exist.
    #[error("{}", fmt_invalid(.file, .line, .field, .reason))]
    Invalid {
        file: String,
        line: Option<usize>,
        field: Option<String>,
        reason: String,
    },
    /// A path leaves its folder (symlink, `..`, absolute).
    #[error("{file}: {source}")]
    Path {
        file: String,
        #[source]
        source: PathError,
    },
    /// `dependsOn` forms a cycle; the services are listed in cycle order.
    #[error("{TOPOLOGY_FILE}: dependsOn cycle: {}", .cycle.join(" → "))]
    Cycle { cycle: Vec<String> },
    /// The commit renders no resources: refused, so that an accidental
    /// empty commit never prunes everything.
    #[error(
        "the commit renders no resources; refusing to apply it (an empty render never prunes)"
    )]
    Empty,
}

fn fmt_invalid(file: &str, line: &Option<usize>, field: &Option<String>, reason: &str) -> String {
    let mut s = file.to_string();
    if let Some(l) = line {
        s.push_str(&format!(":{l}"));
    }
    if let Some(f) = field {
        s.push_str(&format!(": field `{f}`"));
    }
    s.push_str(": ");
    s.push_str(reason);
    s
}

impl RenderError {
    pub fn invalid(
        file: &str,
        field: Option<&str>,
        line: Option<usize>,
        reason: impl fmt::Display,
    ) -> Self {
        RenderError::Invalid {
            file: file.to_string(),
            line,
            field: field.map(str::to_string),
            reason: reason.to_string(),
        }
    }
}
