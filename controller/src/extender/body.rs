//! The extender's HTTP bodies: arguments parsed with node names borrowed
//! from the request body, answers written into one presized buffer.

use std::borrow::Cow;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::{Deserialize, Serialize};

/// Why a request body is not extender arguments: the status and message
/// axum's `Json` extractor would answer (415, 400 for bad JSON, 422 for
/// JSON of the wrong shape).
#[derive(Debug)]
pub struct ArgsRejection {
    pub status: StatusCode,
    pub message: String,
}

/// The extender arguments in `body`, names borrowed from it.
pub fn parse_args<'a>(
    headers: &HeaderMap,
    body: &'a [u8],
) -> Result<ExtenderArgs<'a>, ArgsRejection> {
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json);
    if !json {
        return Err(ArgsRejection {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: "expected request with `Content-Type: application/json`".into(),
        });
    }
    serde_json::from_slice(body).map_err(|error| {
        let status = match error.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ArgsRejection {
            status,
            message: format!("bad extender arguments: {error}"),
        }
    })
}

/// `application/json` or `application/<anything>+json`, any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    kind.eq_ignore_ascii_case("application") && (subtype == "json" || subtype.ends_with("+json"))
}

/// `value` as a JSON body, written into one buffer sized for `entries`
/// node entries (no regrowing while thousands are written).
pub fn json_body<T: Serialize>(value: &T, entries: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(256 + entries.saturating_mul(JSON_BYTES_PER_NODE));
    // Serializing these types cannot fail (string keys, no I/O).
    let _ = serde_json::to_writer(&mut body, value);
    body
}

/// Bytes a node takes in an answer: its name and a reason or a score.
const JSON_BYTES_PER_NODE: usize = 80;

pub(super) fn json_response(body: Vec<u8>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// `ExtenderArgs`. Node names are borrowed from the request body when it
/// allows (no escapes in them, as in every DNS name), so parsing the
/// thousands of candidates of one call allocates no string per name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExtenderArgs<'a> {
    #[serde(alias = "Pod", default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Pod>,
    /// Candidates when the extender is not node-cache capable.
    #[serde(alias = "Nodes", default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    /// Candidates in node-name cache mode.
    #[serde(
        rename = "nodenames",
        alias = "NodeNames",
        alias = "nodeNames",
        default,
        borrow,
        skip_serializing_if = "Option::is_none"
    )]
    pub node_names: Option<Vec<NodeName<'a>>>,
}

/// A node name of an extender call, borrowed from its body when possible.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeName<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl std::ops::Deref for NodeName<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for NodeName<'_> {
    fn from(name: String) -> Self {
        NodeName(Cow::Owned(name))
    }
}

impl<'a> From<&'a str> for NodeName<'a> {
    fn from(name: &'a str) -> Self {
        NodeName(Cow::Borrowed(name))
    }
}

impl PartialEq<&str> for NodeName<'_> {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

/// The parts of a `v1.NodeList` the extender reads and echoes back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    #[serde(default)]
    pub items: Vec<Node>,
}
