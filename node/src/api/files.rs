//! Model files for peers: a node serving a Hub model tells others which
//! model it is (`GET /v1/ring/model`), which bytes of each file it holds
//! (`GET /v1/ring/files/{etag}/held`), and sends byte ranges of them
//! (`GET /v1/ring/files/{etag}` with one `Range`), so that a node fetches
//! its slice over the LAN before the Hub, or with no Hub at all.

use std::ops::Range;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;

use super::{ApiError, AppState};
use crate::hub::{HeldRanges, HubFiles, PeerModel};
use crate::identity::PEER_PASS_HEADER;
use crate::limits::{MAX_PEER_RANGE_BYTES, MAX_PEER_RANGE_READS, PEER_READ_WAIT_SECS};

/// Reads of model bytes for peers under way in this process.
static PEER_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_PEER_RANGE_READS);

/// The served model's files, for a request that proves the cluster secret
/// (`x-ringlet-peer`): only the cluster's nodes learn what it serves.
fn files(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    path: &str,
) -> Result<std::sync::Arc<HubFiles>, ApiError> {
    if let Some(pass) = &state.peer_pass {
        let given = headers.get(PEER_PASS_HEADER).and_then(|v| v.to_str().ok());
        if !pass.check(uri.path(), given, crate::unix_seconds()) {
            return Err(ApiError::NotAPeer);
        }
    }
    (*state.hub_files.get())
        .clone()
        .ok_or_else(|| ApiError::NoRoute {
            path: path.to_string(),
        })
}

/// The Hub model this node serves: its name and files.
pub async fn served_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<PeerModel>, ApiError> {
    let files = files(&state, &headers, &uri, "/v1/ring/model")?;
    Ok(Json(PeerModel {
        name: files.name().to_string(),
        parts: files.remotes(),
    }))
}

/// Which bytes of the file `etag` this node holds.
pub async fn held_ranges(
    State(state): State<AppState>,
    Path(etag): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<HeldRanges>, ApiError> {
    let files = files(&state, &headers, &uri, "/v1/ring/files")?;
    let (size, held) = files.held(&etag).ok_or(ApiError::NotHeld { etag })?;
    Ok(Json(HeldRanges { size, held }))
}

/// One range of the file `etag`, when this node holds all of it.
pub async fn file_range(
    State(state): State<AppState>,
    Path(etag): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let files = files(&state, &headers, &uri, "/v1/ring/files")?;
    let (size, _) = files
        .held(&etag)
        .ok_or_else(|| ApiError::NotHeld { etag: etag.clone() })?;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::BadRange {
            reason: "send one `Range: bytes=START-END`".into(),
        })
        .and_then(|text| parse_range(text, size).map_err(|reason| ApiError::BadRange { reason }))?;
    // A bounded number of reads at once: each holds up to
    // MAX_PEER_RANGE_BYTES and a blocking thread. The others wait their
    // turn, a while.
    let wait = Duration::from_secs(PEER_READ_WAIT_SECS);
    let _permit = tokio::time::timeout(wait, PEER_READS.acquire())
        .await
        .map_err(|_| ApiError::PeerReadsBusy)?
        .map_err(|_| ApiError::PeerReadsBusy)?;
    let read = {
        let (etag, range) = (etag.clone(), range.clone());
        tokio::task::spawn_blocking(move || files.read_held(&etag, range))
            .await
            .map_err(|e| ApiError::internal(format!("the reading task failed: {e}")))?
    };
    let bytes = read
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or(ApiError::NotHeld { etag: etag.clone() })?;
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(header::ETAG, format!("\"{etag}\""))
        .header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", range.start, range.end - 1),
        )
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from(bytes))
        .map_err(|e| ApiError::internal(format!("cannot build the answer: {e}")))
}

/// `bytes=START-END` (END inclusive) as `[START, END + 1)`, inside a file
/// of `size` bytes and no longer than [`MAX_PEER_RANGE_BYTES`].
fn parse_range(text: &str, size: u64) -> Result<Range<u64>, String> {
    let (start, end) = text
        .trim()
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .and_then(|(s, e)| Some((s.trim().parse::<u64>().ok()?, e.trim().parse::<u64>().ok()?)))
        .ok_or_else(|| format!("`{text}` is not bytes=START-END"))?;
    if start > end || end >= size {
        return Err(format!(
            "bytes {start}-{end} are not inside the file's {size}"
        ));
    }
    if end - start + 1 > MAX_PEER_RANGE_BYTES {
        return Err(format!(
            "at most {MAX_PEER_RANGE_BYTES} bytes are sent at once"
        ));
    }
    Ok(start..end + 1)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn one_closed_range_inside_the_file_is_accepted() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(0..10));
        assert_eq!(parse_range(" bytes=90-99", 100), Ok(90..100));
        for bad in [
            "bytes=5-",
            "bytes=-5",
            "bytes=9-3",
            "bytes=0-100",
            "items=0-1",
            "bytes=0-1,4-5",
        ] {
            assert!(parse_range(bad, 100).is_err(), "{bad}");
        }
        assert!(parse_range("bytes=0-16777216", u64::MAX).is_err());
    }
}
