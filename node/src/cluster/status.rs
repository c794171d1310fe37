//! Status: what this node reports about itself every status interval (its
//! memory, the models in its cache or on their way, its stage's load), and
//! the downloads it runs for the cluster. The figures that cost a system
//! call are read once per interval, never per event.

use crate::cluster::protocol::{
    LinkMeasurement, ModelAvailability, ModelState, NodeStatus, Resources,
};
use crate::cluster::resources::{process_memory, system_memory};
use crate::model_store::{
    CATALOGUE, CatalogueEntry, Download, Downloads, ModelStore, catalogue_entry,
};

/// This machine's figures as last read.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct LocalFigures {
    pub memory_available_bytes: u64,
    pub models: Vec<ModelAvailability>,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

/// What this node tells peers of its load, at once when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Load {
    /// Requests going through this node's stage, from every owner.
    pub in_flight: u32,
    /// KV cache reserved by the requests this node owns, in tokens.
    pub kv_reserved_tokens: u64,
    /// Bytes this node's stage has for KV cache.
    pub stage_kv_budget_bytes: Option<u64>,
}

pub(super) struct LocalStatus {
    /// The model this node serves (which may be a file outside the
    /// catalogue).
    serving: String,
    /// Available memory at the start, for where it cannot be read again.
    memory_at_start: u64,
    model_store: ModelStore,
    downloads: Downloads,
    pub figures: LocalFigures,
    /// The stage load last reported to peers.
    reported_load: Option<Load>,
}

impl LocalStatus {
    pub fn new(
        serving: String,
        resources: &Resources,
        model_store: ModelStore,
        downloads: Downloads,
    ) -> Self {
        let mut status = Self {
            serving,
            memory_at_start: resources.memory_available_bytes,
            model_store,
            downloads,
            figures: LocalFigures::default(),
            reported_load: None,
        };
        status.refresh();
        status
    }

    /// The node serves another model now.
    pub fn set_serving(&mut self, name: String) {
        self.serving = name;
        self.refresh();
    }

    /// Reads this machine's figures again; true when they changed.
    pub fn refresh(&mut self) -> bool {
        let (rss_bytes, peak_rss_bytes) = process_memory();
        let figures = LocalFigures {
            memory_available_bytes: system_memory()
                .map_or(self.memory_at_start, |(_, available)| available),
            models: self.model_availability(),
            rss_bytes,
            peak_rss_bytes,
        };
        let changed = figures != self.figures;
        self.figures = figures;
        changed
    }

    /// The report for peers, with the stage's load and the links' figures.
    pub fn report(
        &self,
        load: Load,
        links: Vec<LinkMeasurement>,
        serving_since_ms: Option<u64>,
    ) -> NodeStatus {
        NodeStatus {
            in_flight: load.in_flight,
            links,
            memory_available_bytes: self.figures.memory_available_bytes,
            rss_bytes: self.figures.rss_bytes,
            models: self.figures.models.clone(),
            serving_since_ms,
            kv_reserved_tokens: load.kv_reserved_tokens,
            stage_kv_budget_bytes: load.stage_kv_budget_bytes,
        }
    }

    /// True when the load differs from what peers were told.
    pub fn load_changed(&self, load: Load) -> bool {
        self.reported_load != Some(load)
    }

    /// Every peer was told `load`.
    pub fn reported(&mut self, load: Load) {
        self.reported_load = Some(load);
    }

    /// Starts fetching `entry` here unless it is present or on its way;
    /// true when this call started it.
    fn start(&mut self, entry: &'static CatalogueEntry) -> bool {
        let started = self.downloads.start(&self.model_store, entry);
        self.refresh();
        started
    }

    /// Fetches `entry` here unless it is present; true when it is being
    /// fetched (started now or before).
    pub fn fetch(&mut self, entry: &'static CatalogueEntry) -> bool {
        self.start(entry)
            || matches!(
                self.downloads.state(entry.name),
                Some(Download::Running { .. })
            )
    }

    /// A peer asked this node to fetch `name`: whether this call started
    /// it, or `None` when this node does not know it (a newer ringlet's
    /// model).
    pub fn fetch_for_peer(&mut self, name: &str) -> Option<bool> {
        catalogue_entry(name).map(|entry| self.start(entry))
    }

    /// Which catalogue models are in this node's cache or on their way,
    /// and the one it serves.
    fn model_availability(&self) -> Vec<ModelAvailability> {
        let serving = &self.serving;
        let mut models: Vec<ModelAvailability> = CATALOGUE
            .iter()
            .filter(|entry| entry.name != serving)
            .map(|entry| {
                let download = self.downloads.state(entry.name);
                if let Some(Download::Running {
                    done_bytes,
                    total_bytes,
                }) = download
                {
                    ModelAvailability {
                        downloaded_bytes: Some(done_bytes),
                        total_bytes: Some(total_bytes),
                        ..ModelAvailability::new(entry.name, ModelState::Downloading)
                    }
                } else if self.model_store.is_present(entry) {
                    ModelAvailability::new(entry.name, ModelState::Present)
                } else {
                    ModelAvailability {
                        error: match download {
                            Some(Download::Failed(error)) => Some(error),
                            _ => None,
                        },
                        ..ModelAvailability::new(entry.name, ModelState::Missing)
                    }
                }
            })
            .collect();
        // The model served: loaded, or this node's slice of it on its way
        // (the last fetch's failure, if any, goes with it).
        let served = match self.downloads.state(serving) {
            Some(Download::Running {
                done_bytes,
                total_bytes,
            }) => ModelAvailability {
                downloaded_bytes: Some(done_bytes),
                total_bytes: Some(total_bytes),
                ..ModelAvailability::new(serving.clone(), ModelState::Downloading)
            },
            Some(Download::Failed(error)) => ModelAvailability {
                error: Some(error),
                ..ModelAvailability::new(serving.clone(), ModelState::Loaded)
            },
            None => ModelAvailability::new(serving.clone(), ModelState::Loaded),
        };
        let at = CATALOGUE
            .iter()
            .position(|entry| entry.name == serving)
            .unwrap_or(models.len());
        models.insert(at, served);
        // Models being opened for a switch, or that failed to open.
        for (name, download) in self.downloads.all() {
            if models.iter().any(|m| m.name == name) {
                continue;
            }
            models.push(match download {
                Download::Running {
                    done_bytes,
                    total_bytes,
                } => ModelAvailability {
                    downloaded_bytes: Some(done_bytes),
                    total_bytes: Some(total_bytes),
                    ..ModelAvailability::new(name, ModelState::Downloading)
                },
                Download::Failed(error) => ModelAvailability {
                    error: Some(error),
                    ..ModelAvailability::new(name, ModelState::Missing)
                },
            });
        }
        models
    }
}

/// Whether a peer's last report says it has the model `name`.
pub(super) fn reports_model(status: Option<&NodeStatus>, name: &str) -> bool {
    status.is_some_and(|status| {
        status
            .models
            .iter()
            .any(|m| m.name == name && matches!(m.state, ModelState::Loaded | ModelState::Present))
    })
}
