//! Naming a model on the Hugging Face Hub: `ORG/REPO[:QUANT][@REVISION]`,
//! and choosing the GGUF file (and its split parts) that the name means in
//! a repository's file list, the way llama.cpp's `-hf` does.
//!
//! Pure logic: fetching the list and the files is the download code's
//! business.

use std::fmt;

/// The quantizations tried, in order, when a name gives none.
pub const DEFAULT_QUANTS: [&str; 2] = ["Q4_K_M", "Q8_0"];

/// A model named by its Hub repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `ORG/REPO`.
    pub repo: String,
    /// The quantization asked for, as written (matched without case).
    pub quant: Option<String>,
    /// A branch, tag or commit; `None` for `main`.
    pub revision: Option<String>,
}

/// Why a name is not a Hub model name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("`{0}` is not ORG/REPO[:QUANT][@REVISION]: a Hub repository has one `/`")]
    NotARepo(String),
    #[error("`{0}` has an empty quantization or revision after `:` or `@`")]
    EmptyPart(String),
}

impl HubModel {
    /// Parses `ORG/REPO[:QUANT][@REVISION]`. The revision comes off first:
    /// git ref names cannot hold `:`, but may hold `/` (`refs/pr/1`).
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let (rest, revision) = match name.split_once('@') {
            Some((rest, revision)) => (rest, Some(revision)),
            None => (name, None),
        };
        let (repo, quant) = match rest.split_once(':') {
            Some((repo, quant)) => (repo, Some(quant)),
            None => (rest, None),
        };
        let valid_part = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match repo.split_once('/') {
            Some((org, name)) if valid_part(org) && valid_part(name) => {}
            _ => return Err(NameError::NotARepo(name.to_string())),
        }
        if quant.is_some_and(str::is_empty) || revision.is_some_and(str::is_empty) {
            return Err(NameError::EmptyPart(name.to_string()));
        }
        Ok(Self {
            repo: repo.to_string(),
            quant: quant.map(str::to_string),
            revision: revision.map(str::to_string),
        })
    }
}

impl fmt::Display for HubModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repo)?;
        if let Some(quant) = &self.quant {
            write!(f, ":{quant}")?;
        }
        if let Some(revision) = &self.revision {
            write!(f, "@{revision}")?;
        }
        Ok(())
    }
}

/// The GGUF file a name picks, with every part when it is split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenFile {
    /// Its quantization, as the file name says it (`Q4_K_M`), if it says.
    pub quant: Option<String>,
    /// The file, or its parts in order.
    pub parts: Vec<String>,
}

/// Why no file fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChoiceError {
    #[error(
        "{repo} holds no GGUF file; ringlet runs GGUF models (look for a repository whose name ends in -GGUF)"
    )]
    NoGguf { repo: String },
    #[error("{repo} has no GGUF file for {quant}; it has: {}", .available.join(", "))]
    NoSuchQuant {
        repo: String,
        quant: String,
        available: Vec<String>,
    },
    #[error("{repo} lacks part {missing} of {count} of {first}")]
    MissingPart {
        repo: String,
        first: String,
        missing: usize,
        count: usize,
    },
}

/// A split part's name: `STEM-00001-of-00003.gguf` → (`STEM`, 1, 3).
fn split_part(file: &str) -> Option<(&str, usize, usize)> {
    let stem = file.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, number) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(number) || !digits(count) {
        return None;
    }
    Some((prefix, number.parse().ok()?, count.parse().ok()?))
}

/// The base name without folders.
fn base_name(file: &str) -> &str {
    file.rsplit('/').next().unwrap_or(file)
}

/// Model files, not the projector, imatrix or draft files beside them.
fn is_model_gguf(file: &str) -> bool {
    let base = base_name(file).to_ascii_lowercase();
    base.ends_with(".gguf")
        && !["mmproj", "imatrix", "mtp-", "eagle3-"]
            .iter()
            .any(|skip| base.contains(skip))
        && split_part(file).is_none_or(|(_, number, _)| number == 1)
}

/// A file's quantization: the last `-` or `.` separated word of its base
/// name (without `.gguf` and a split suffix), upper-cased, when it looks
/// like one (`Q4_K_M`, `IQ4_XS`, `F16`, `BF16`).
pub fn quant_of(file: &str) -> Option<String> {
    let base = base_name(file);
    let stem = match split_part(base) {
        Some((prefix, _, _)) => prefix,
        None => base.strip_suffix(".gguf")?,
    };
    let word = stem.rsplit(['-', '.']).next()?.to_ascii_uppercase();
    let looks_like = word.starts_with('Q')
        || word.starts_with("IQ")
        || word.starts_with('F')
        || word.starts_with("BF");
    (looks_like && word.len() > 1 && word.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then_some(word)
}

/// Whether `file`'s name carries `quant` followed by `.` or `-` (no case).
fn names_quant(file: &str, quant: &str) -> bool {
    let base = base_name(file).to_ascii_lowercase();
    let quant = quant.to_ascii_lowercase();
    base.match_indices(&quant)
        .any(|(at, _)| matches!(base.as_bytes().get(at + quant.len()), Some(b'.' | b'-')))
}

/// Chooses the file `model` means among a repository's `files`: the first
/// model GGUF naming the quantization asked for, or without one the first
/// of [`DEFAULT_QUANTS`] present, else the first model GGUF. A split file
/// comes with all its parts, which must all be listed.
pub fn choose_file(model: &HubModel, files: &[String]) -> Result<ChosenFile, ChoiceError> {
    let repo = model.repo.clone();
    let candidates: Vec<&String> = files.iter().filter(|f| is_model_gguf(f)).collect();
    if candidates.is_empty() {
        return Err(ChoiceError::NoGguf { repo });
    }
    let find = |quant: &str| candidates.iter().find(|f| names_quant(f, quant)).copied();
    let chosen = match &model.quant {
        Some(quant) => find(quant).ok_or_else(|| {
            let mut available: Vec<String> = candidates
                .iter()
                .map(|f| quant_of(f).unwrap_or_else(|| base_name(f).to_string()))
                .collect();
            available.dedup();
            ChoiceError::NoSuchQuant {
                repo: repo.clone(),
                quant: quant.clone(),
                available,
            }
        })?,
        None => DEFAULT_QUANTS
            .iter()
            .find_map(|q| find(q))
            .unwrap_or(candidates[0]),
    };
    let parts = match split_part(chosen) {
        None => vec![chosen.clone()],
        Some((prefix, _, count)) => (1..=count)
            .map(|number| {
                let part = format!("{prefix}-{number:05}-of-{count:05}.gguf");
                if files.contains(&part) {
                    Ok(part)
                } else {
                    Err(ChoiceError::MissingPart {
                        repo: repo.clone(),
                        first: chosen.clone(),
                        missing: number,
                        count,
                    })
                }
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(ChosenFile {
        quant: quant_of(chosen),
        parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn names_parse_with_quant_and_revision() {
        let model =
            HubModel::parse("bartowski/Qwen2.5-7B-Instruct-GGUF:q4_k_m@refs/pr/1").expect("a name");
        assert_eq!(model.repo, "bartowski/Qwen2.5-7B-Instruct-GGUF");
        assert_eq!(model.quant.as_deref(), Some("q4_k_m"));
        assert_eq!(model.revision.as_deref(), Some("refs/pr/1"));
        assert_eq!(
            model.to_string(),
            "bartowski/Qwen2.5-7B-Instruct-GGUF:q4_k_m@refs/pr/1"
        );
        let plain = HubModel::parse("org/repo").expect("a name");
        assert_eq!((plain.quant, plain.revision), (None, None));
        for bad in [
            "smollm2-135m",
            "a/b/c",
            "/repo",
            "org/",
            "./x.gguf",
            "org/re po",
        ] {
            assert!(
                matches!(HubModel::parse(bad), Err(NameError::NotARepo(_))),
                "{bad}"
            );
        }
        assert_eq!(
            HubModel::parse("org/repo:"),
            Err(NameError::EmptyPart("org/repo:".into()))
        );
        assert!(HubModel::parse("org/repo@").is_err());
    }

    #[test]
    fn the_quant_asked_for_is_matched_without_case() {
        let listing = files(&[
            "README.md",
            "model-Q8_0.gguf",
            "model-Q4_K_M.gguf",
            "model-Q4_K_S.gguf",
            "mmproj-model-f16.gguf",
        ]);
        let pick = |name: &str| {
            choose_file(&HubModel::parse(name).expect("name"), &listing).map(|c| c.parts)
        };
        assert_eq!(pick("o/r:q4_k_s"), Ok(files(&["model-Q4_K_S.gguf"])));
        assert_eq!(
            pick("o/r"),
            Ok(files(&["model-Q4_K_M.gguf"])),
            "the default"
        );
        assert_eq!(pick("o/r:Q8_0"), Ok(files(&["model-Q8_0.gguf"])));
        let Err(ChoiceError::NoSuchQuant { available, .. }) = pick("o/r:Q5_K_M") else {
            panic!("no Q5_K_M")
        };
        assert_eq!(available, vec!["Q8_0", "Q4_K_M", "Q4_K_S"]);
        assert!(matches!(
            choose_file(&HubModel::parse("o/r").expect("name"), &files(&["a.txt"])),
            Err(ChoiceError::NoGguf { .. })
        ));
    }

    #[test]
    fn without_a_default_quant_the_first_model_file_is_taken() {
        let listing = files(&["mmproj-x.gguf", "x-F16.gguf", "x-IQ4_XS.gguf"]);
        let chosen = choose_file(&HubModel::parse("o/r").expect("name"), &listing).expect("a file");
        assert_eq!(chosen.parts, files(&["x-F16.gguf"]));
        assert_eq!(chosen.quant.as_deref(), Some("F16"));
    }

    #[test]
    fn split_files_come_with_every_part_or_not_at_all() {
        let mut listing = files(&[
            "big-Q4_K_M-00002-of-00003.gguf",
            "big-Q4_K_M-00001-of-00003.gguf",
            "big-Q4_K_M-00003-of-00003.gguf",
        ]);
        let model = HubModel::parse("o/r:Q4_K_M").expect("name");
        let chosen = choose_file(&model, &listing).expect("a file");
        assert_eq!(
            chosen.parts,
            files(&[
                "big-Q4_K_M-00001-of-00003.gguf",
                "big-Q4_K_M-00002-of-00003.gguf",
                "big-Q4_K_M-00003-of-00003.gguf",
            ])
        );
        assert_eq!(chosen.quant.as_deref(), Some("Q4_K_M"));
        listing.remove(0);
        assert!(matches!(
            choose_file(&model, &listing),
            Err(ChoiceError::MissingPart {
                missing: 2,
                count: 3,
                ..
            })
        ));
    }
}
