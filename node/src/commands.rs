//! `ringlet pull` and `ringlet models`, and the dispatch of every command.

use anyhow::Context;

use crate::cli::{BenchMode, Command, InviteArgs, ModelsArgs, PullArgs};
use crate::hub::{self, FetchProgress, HubClient, HubConfig, HubModel};
use crate::model_store::{CATALOGUE, catalogue_entry};

pub async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => crate::serve::serve(args).await,
        Command::Run(args) => crate::run::run(args).await,
        Command::Pull(args) => pull(args).await,
        Command::Models(args) => models(args),
        Command::Invite(args) => invite(&args),
        Command::Bench(args) => match args.mode {
            Some(BenchMode::Ring(ring)) => crate::bench::ring::bench(ring).await,
            Some(BenchMode::Chunks(chunks)) => crate::bench::chunks::bench(chunks).await,
            Some(BenchMode::Recovery(recovery)) => crate::bench::recovery::bench(recovery).await,
            Some(BenchMode::Policy(policy)) => crate::bench::policy::bench(policy).await,
            Some(BenchMode::Cluster(cluster)) => crate::bench::cluster::bench(cluster).await,
            Some(BenchMode::Structured(structured)) => {
                crate::bench::structured::bench(structured).await
            }
            None => crate::bench::bench(args.engine).await,
        },
    }
}

/// Prints the join token on stdout (alone, for scripts) and how to use
/// it on stderr.
fn invite(args: &InviteArgs) -> anyhow::Result<()> {
    let dir = crate::identity::config_dir(args.config_dir.as_deref())?;
    let (identity, membership) = crate::identity::Identity::load_or_create(&dir, None)?;
    if membership == crate::identity::Membership::Created {
        eprintln!("Created a new cluster secret in {}.", dir.display());
    }
    let token = identity.token();
    println!("{token}");
    eprintln!(
        "\nThis token admits a machine to the cluster: keep it secret. On the new machine:\n\n  \
         ringlet --join {token}\n\n(or RINGLET_JOIN={token}; add --peer HOST:PORT where multicast does not reach)"
    );
    Ok(())
}

async fn pull(args: PullArgs) -> anyhow::Result<()> {
    if catalogue_entry(&args.model).is_none()
        && let Ok(model) = HubModel::parse(&args.model)
    {
        return pull_from_hub(&model).await;
    }
    let store = args.cache.store();
    let entry = catalogue_entry(&args.model).with_context(|| {
        let known: Vec<&str> = CATALOGUE.iter().map(|e| e.name).collect();
        format!(
            "`{}` is not a catalogue model; known models: {}",
            args.model,
            known.join(", ")
        )
    })?;
    if store.is_present(entry) {
        println!(
            "{} is already in the cache: {}",
            entry.name,
            store.path_of(entry).display()
        );
        return Ok(());
    }
    let path = store.fetch(entry).await?;
    println!("{} fetched and verified: {}", entry.name, path.display());
    Ok(())
}

/// Downloads a whole Hub model file into the Hugging Face cache (resuming
/// what an earlier pull or a node left there) and checks its SHA-256.
async fn pull_from_hub(model: &HubModel) -> anyhow::Result<()> {
    let client = HubClient::new(HubConfig::from_env())?;
    let file = hub::open(&client, model, &[]).await?;
    if file.files.is_complete() {
        let first = file.paths.first().map(|p| p.display().to_string());
        println!(
            "{} is in the cache: {}",
            file.name,
            first.unwrap_or_default()
        );
        return Ok(());
    }
    let progress = FetchProgress::new(file.name.clone(), |_, _| {});
    let completed = file
        .files
        .complete(&|done, total| progress.update(done, total))
        .await;
    drop(progress);
    let (paths, fetched) = completed?;
    println!(
        "{} fetched and verified ({:.1} MiB downloaded, {:.1} MiB were on disk): {}",
        file.name,
        fetched.downloaded as f64 / (1 << 20) as f64,
        fetched.on_disk as f64 / (1 << 20) as f64,
        paths
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}

fn models(args: ModelsArgs) -> anyhow::Result<()> {
    let store = args.cache.store();
    println!("model cache: {}", store.dir().display());
    println!("{:<16} {:>9}  {:<10} description", "name", "size", "status");
    for entry in CATALOGUE {
        let status = if store.is_present(entry) {
            "cached"
        } else {
            "not cached"
        };
        println!(
            "{:<16} {:>6} MB  {:<10} {}",
            entry.name,
            entry.bytes / 1_000_000,
            status,
            entry.description
        );
    }
    Ok(())
}
