//! Models: the OpenAI-style `GET /v1/models`, and ringlet's
//! `GET /v1/cluster/models` with its downloads.

use serde::{Deserialize, Serialize};

/// OpenAI's `object` field: what kind of thing a JSON object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Object {
    #[serde(rename = "list")]
    List,
    #[serde(rename = "model")]
    Model,
    #[serde(rename = "chat.completion")]
    ChatCompletion,
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
    /// A legacy completion, whole or a streamed chunk.
    #[serde(rename = "text_completion")]
    TextCompletion,
}

/// `GET /v1/models`: the model this node (and so the cluster) serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// [`Object::List`].
    pub object: Object,
    pub data: Vec<ModelCard>,
}

/// `GET /v1/models/{id}`, and an entry of [`ModelList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The id clients pass as `model`.
    pub id: String,
    /// [`Object::Model`].
    pub object: Object,
    /// Unix time the model was loaded.
    pub created: u64,
    pub owned_by: String,
}

/// `GET /v1/cluster/models`: the models ringlet can fetch by name, and the
/// one served. Which nodes have them is in the cluster view
/// (`nodes[].models`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownModels {
    pub models: Vec<KnownModel>,
}

/// A model the node knows: the catalogue's, and the one it serves.
///
/// The fields are in alphabetical order: the node wrote this JSON through
/// `serde_json::Value`, whose keys are sorted, and the order is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownModel {
    pub description: String,
    /// In the catalogue, so nodes can fetch it by name.
    pub downloadable: bool,
    pub id: String,
    /// The model this node (and so the cluster) serves.
    pub served: bool,
    pub size_bytes: Option<u64>,
}

/// The answer to `POST /v1/cluster/models/{name}/download`: 202 while
/// `fetching_on` names nodes, 200 when every node has the model already.
///
/// Alphabetical field order, as for [`KnownModel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadStarted {
    /// The names of the nodes that fetch it.
    pub fetching_on: Vec<String>,
    /// What happens, in a sentence.
    pub message: String,
    pub model: String,
}

/// `POST /v1/cluster/models`: switch every node to this model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchModel {
    /// A catalogue name, a GGUF path every node has, or a Hugging Face
    /// repository `ORG/REPO[:QUANT][@REVISION]`.
    pub model: String,
}

/// The answer to a switch: which nodes were told. Alphabetical field
/// order, as for [`KnownModel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchStarted {
    /// What happens, in a sentence.
    pub message: String,
    pub model: String,
    /// The names of the nodes told to switch, this one first.
    pub nodes: Vec<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed expectation is the report

    use super::*;

    #[test]
    fn model_listings_are_written_as_always() {
        let list = ModelList {
            object: Object::List,
            data: vec![ModelCard {
                id: "smollm2-135m".into(),
                object: Object::Model,
                created: 7,
                owned_by: "ringlet".into(),
            }],
        };
        let json = r#"{"object":"list","data":[{"id":"smollm2-135m","object":"model","created":7,"owned_by":"ringlet"}]}"#;
        assert_eq!(serde_json::to_string(&list).unwrap(), json);
        assert_eq!(serde_json::from_str::<ModelList>(json).unwrap(), list);

        let known = KnownModels {
            models: vec![KnownModel {
                description: "a GGUF file given by its path".into(),
                downloadable: false,
                id: "mine".into(),
                served: true,
                size_bytes: None,
            }],
        };
        let json = concat!(
            r#"{"models":[{"description":"a GGUF file given by its path","downloadable":false,"#,
            r#""id":"mine","served":true,"size_bytes":null}]}"#,
        );
        assert_eq!(serde_json::to_string(&known).unwrap(), json);
        assert_eq!(serde_json::from_str::<KnownModels>(json).unwrap(), known);

        let started = DownloadStarted {
            fetching_on: vec!["node-1".into()],
            message: "Fetching it.".into(),
            model: "smollm2-135m".into(),
        };
        let json = r#"{"fetching_on":["node-1"],"message":"Fetching it.","model":"smollm2-135m"}"#;
        assert_eq!(serde_json::to_string(&started).unwrap(), json);
        assert_eq!(
            serde_json::from_str::<DownloadStarted>(json).unwrap(),
            started
        );
    }
}
