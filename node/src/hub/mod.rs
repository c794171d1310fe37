//! Models from the Hugging Face Hub: naming one and choosing its file
//! (`naming`), the Hub's API and cache conventions (`client`), a file held
//! in part, whose ranges are fetched as shards need them (`partial`,
//! over `ranges`), and download progress (`progress`).

// Byte ranges are the subject here: `&[0..len]` is a list of one range.
#![allow(clippy::single_range_in_vec_init)]

mod client;
mod naming;
mod partial;
mod progress;
mod ranges;

pub use client::{HeldRanges, HubClient, HubConfig, HubError, PeerModel, RemoteFile};
pub use naming::{
    ChoiceError, ChosenFile, DEFAULT_QUANTS, HubModel, NameError, choose_file, quant_of,
};
pub use partial::{Fetched, HubFile, HubFiles, Source, open};
pub use progress::FetchProgress;
pub use ranges::RangeSet;
