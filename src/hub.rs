//! Hugging Face hub ids (`ORG/NAME[@REVISION]`): resolved through the local cache
//! exactly as `huggingface_hub` lays it out, and, when the files are missing, by
//! downloading only what a comparison reads (config, index, weight shards) into that
//! same layout, so Python tools and weightdiff share one cache.
//!
//! The cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
//! else `~/.cache/huggingface/hub`. A repo lives in `models--ORG--NAME/` with
//! `refs/REVISION` (a file holding the commit hash), `blobs/ETAG` (file contents, named
//! by the hub's ETag: the SHA-256 of LFS files, the git blob hash of others), and
//! `snapshots/COMMIT/FILE`, relative symlinks into `blobs/`.
//!
//! Downloads honour `HF_ENDPOINT`, `HF_TOKEN` (else `$HF_HOME/token`) and
//! `HF_HUB_OFFLINE=1`, under which nothing is fetched.

use crate::checkpoint::formats::{self, Selected};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Told about downloads (the CLI draws a progress bar; the library prints nothing).
pub trait DownloadProgress {
    /// A file starts downloading; `bytes` when the hub announced its size.
    fn start(&self, file: &str, bytes: Option<u64>);
    /// `n` more bytes of the current file arrived.
    fn advance(&self, n: u64);
    /// The current file is complete.
    fn finish(&self);
}

/// Reports nothing.
pub struct Silent;

impl DownloadProgress for Silent {
    fn start(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

pub use crate::checkpoint::HubOrigin;

/// A parsed `ORG/NAME[@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    pub repo: String,
    pub revision: String,
    /// One file of the repo to read (`ORG/NAME:FILE.gguf`, for repos of several GGUF
    /// quants): only it is downloaded.
    pub file: Option<String>,
}

impl RepoId {
    /// Parses a hub id; `None` for anything else (a model argument that is not an
    /// existing path is tried as a hub id only when it has this shape).
    pub fn parse(s: &str) -> Option<RepoId> {
        let (s, file) = match s.split_once(':') {
            Some((head, f))
                if !f.is_empty()
                    && !f.starts_with('/')
                    && !f.split('/').any(|c| c.is_empty() || c == "." || c == "..")
                    && f.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
                    }) =>
            {
                (head, Some(f.to_string()))
            }
            Some(_) => return None,
            None => (s, None),
        };
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() && !rev.contains("..") => (r, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with(['.', '-'])
                && !p.contains("--")
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let rev_ok = revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
            && !revision.starts_with('/');
        (part(org) && part(name) && rev_ok).then(|| RepoId {
            repo: repo.to_string(),
            revision: revision.to_string(),
            file,
        })
    }

    /// `models--ORG--NAME`.
    pub fn folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.revision == "main" {
            write!(f, "{}", self.repo)?;
        } else {
            write!(f, "{}@{}", self.repo, self.revision)?;
        }
        match &self.file {
            Some(file) => write!(f, ":{file}"),
            None => Ok(()),
        }
    }
}

/// Cache location, endpoint, token and offline mode, from the environment.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub cache: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    pub offline: bool,
}

impl HubSettings {
    /// Reads the variables `huggingface_hub` reads.
    pub fn from_env() -> HubSettings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HOME").map(PathBuf::from).unwrap_or_default();
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        let truthy = |k: &str| {
            var(k).is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
            })
        };
        HubSettings {
            cache,
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token,
            offline: truthy("HF_HUB_OFFLINE"),
        }
    }
}

fn hub_error(id: &RepoId, reason: impl Into<String>) -> Error {
    Error::Hub {
        repo: id.to_string(),
        reason: reason.into(),
    }
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Opens a model argument: an existing path as it is, otherwise a hub id through the
/// cache (downloading when needed and allowed), telling `progress` about downloads.
pub fn open_model(
    arg: &Path,
    settings: &HubSettings,
    progress: &dyn DownloadProgress,
) -> Result<crate::Checkpoint> {
    let Some(id) = hub_candidate(arg) else {
        return crate::Checkpoint::open(arg);
    };
    // A mistyped local path is the likelier mistake: say so first, the hub second.
    let origin = resolve(&id, settings, progress).map_err(|e| Error::NotAModel {
        path: arg.to_path_buf(),
        reason: format!(
            "no such file or directory; tried as a Hugging Face hub id too, which failed: {e}"
        ),
    })?;
    let target = match &id.file {
        Some(file) => origin.snapshot.join(file),
        None => origin.snapshot.clone(),
    };
    let mut ck = crate::Checkpoint::open(&target)?;
    ck.source = PathBuf::from(id.to_string());
    ck.hub = Some(origin);
    Ok(ck)
}

/// The hub id a model argument stands for: `ORG/NAME[@REVISION]` that is not a path —
/// nothing of that name exists, it is not written as a path (`./`, `../`, `/`), and its
/// first component is not a local directory (`models/my-finetune` beside `models/` is a
/// mistyped path, not a repo).
pub fn hub_candidate(arg: &Path) -> Option<RepoId> {
    if arg.exists() || arg.is_absolute() {
        return None;
    }
    let s = arg.to_str()?;
    if s.starts_with("./") || s.starts_with("../") || s.starts_with('~') {
        return None;
    }
    let org = s.split('/').next()?;
    if Path::new(org).is_dir() {
        return None;
    }
    RepoId::parse(s)
}

/// Resolves `id` to a snapshot directory holding its weights, downloading what is
/// missing unless offline.
pub fn resolve(
    id: &RepoId,
    settings: &HubSettings,
    progress: &dyn DownloadProgress,
) -> Result<HubOrigin> {
    let repo_dir = settings.cache.join(id.folder());
    if let Some(commit) = cached_commit(&repo_dir, &id.revision) {
        let snapshot = repo_dir.join("snapshots").join(&commit);
        let complete = match &id.file {
            Some(file) => snapshot.join(file).is_file(),
            None => weights_complete(&snapshot),
        };
        if complete {
            tracing::info!(repo = %id, commit = %commit, "found in the Hugging Face cache");
            return Ok(HubOrigin {
                repo_id: id.repo.clone(),
                revision: id.revision.clone(),
                commit,
                snapshot,
            });
        }
    }
    if settings.offline {
        return Err(hub_error(
            id,
            format!(
                "not in the Hugging Face cache at {} and HF_HUB_OFFLINE=1 forbids downloading; \
                 on a machine with network run `hf download {}{} --include '*.json' '*.safetensors'` \
                 (with the same HF_HOME / HF_HUB_CACHE), or unset HF_HUB_OFFLINE",
                settings.cache.display(),
                id.repo,
                if id.revision == "main" {
                    String::new()
                } else {
                    format!(" --revision {}", id.revision)
                }
            ),
        ));
    }
    download(id, settings, &repo_dir, progress)
}

/// The commit a revision points at in the cache, if known.
fn cached_commit(repo_dir: &Path, revision: &str) -> Option<String> {
    if is_commit(revision) {
        return Some(revision.to_string());
    }
    let refs = repo_dir.join("refs").join(revision);
    let commit = std::fs::read_to_string(refs).ok()?.trim().to_string();
    is_commit(&commit).then_some(commit)
}

/// Whether a snapshot holds a complete set of weights: the files that opening it will
/// read ([`formats::select`], the rule [`crate::Checkpoint::open`] applies).
fn weights_complete(snapshot: &Path) -> bool {
    let Ok(listing) = std::fs::read_dir(snapshot) else {
        return false;
    };
    let names: Vec<String> = listing
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    match formats::select(&names) {
        None => false,
        // One file of a layout that takes one of several (a GGUF quant) proves nothing:
        // the repository may hold others, and which one is meant must be asked.
        Some((f, Selected::Files(_))) => !matches!(f.select, formats::Select::Single),
        Some((_, Selected::Ambiguous(_))) => false,
        Some((_, Selected::Index(index))) => {
            crate::checkpoint::index::Index::read(&snapshot.join(index), snapshot).is_ok_and(|i| {
                !i.weight_map.is_empty() && i.files().iter().all(|f| snapshot.join(f).is_file())
            })
        }
    }
}

/// `GET /api/models/REPO/revision/REV`: the commit and the file list.
#[derive(Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

struct Client<'a> {
    settings: &'a HubSettings,
    /// Redirects are followed by [`Client::call`], which decides where the token goes.
    agent: ureq::Agent,
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let rest = url.find("://").map_or(0, |i| i + 3);
    url[rest..].find('/').map_or(url, |i| &url[..rest + i])
}

/// Maximum redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

impl Client<'_> {
    fn new(settings: &HubSettings) -> Client<'_> {
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .user_agent(concat!("weightdiff/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            settings,
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// GET (`head` false) or HEAD `url`, following redirects: all of them for a GET
    /// (file contents live on a CDN), only those within the hub for a HEAD (the hub's
    /// own headers — ETag, size, commit — are on the response that points at the CDN,
    /// as huggingface_hub reads them). The token goes to the hub's host only, never to
    /// a CDN.
    fn call(
        &self,
        url: &str,
        head: bool,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let hub = origin(&self.settings.endpoint).to_string();
        let mut url = url.to_string();
        for _ in 0..MAX_REDIRECTS {
            let mut req = if head {
                self.agent.head(&url)
            } else {
                self.agent.get(&url)
            };
            if origin(&url) == hub
                && let Some(t) = &self.settings.token
            {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let resp = req.call()?;
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let next = match location {
                Some(l) if resp.status().is_redirection() => {
                    if l.starts_with("http://") || l.starts_with("https://") {
                        l
                    } else if l.starts_with('/') {
                        format!("{}{l}", origin(&url))
                    } else {
                        return Ok(resp);
                    }
                }
                _ => return Ok(resp),
            };
            if head && origin(&next) != hub {
                return Ok(resp);
            }
            url = next;
        }
        Err(ureq::Error::TooManyRedirects)
    }

    /// Explains a failed status the way a user can act on.
    fn status_error(&self, id: &RepoId, what: &str, status: u16) -> Error {
        let hint = match status {
            401 | 403 => {
                if self.settings.token.is_some() {
                    "the token in HF_TOKEN has no access: accept the model's terms on its page, or use a token that can read it"
                } else {
                    "the repository is gated or private: set HF_TOKEN to a token that can read it"
                }
            }
            404 => {
                "no such repository, revision or file (a gated repository also answers 404 without a token)"
            }
            _ => "the hub answered with an error",
        };
        hub_error(id, format!("{what}: HTTP {status}: {hint}"))
    }
}

fn download(
    id: &RepoId,
    settings: &HubSettings,
    repo_dir: &Path,
    progress: &dyn DownloadProgress,
) -> Result<HubOrigin> {
    let client = Client::new(settings);
    let net = |e: ureq::Error| {
        hub_error(
            id,
            format!(
                "cannot reach {}: {e} (set HF_HUB_OFFLINE=1 to use only the cache)",
                settings.endpoint
            ),
        )
    };
    // The revision is one path segment: `refs/pr/1` becomes `refs%2Fpr%2F1`.
    let api = format!(
        "{}/api/models/{}/revision/{}",
        settings.endpoint,
        id.repo,
        encode_path(&id.revision).replace('/', "%2F")
    );
    let mut resp = client.call(&api, false).map_err(net)?;
    if resp.status() != 200 {
        return Err(client.status_error(id, "repository info", resp.status().as_u16()));
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .map_err(net)?;
    let info: RepoInfo = serde_json::from_str(&body)
        .map_err(|e| hub_error(id, format!("unexpected repository info: {e}")))?;
    if !is_commit(&info.sha) {
        return Err(hub_error(
            id,
            format!("unexpected commit id `{}`", info.sha),
        ));
    }
    let commit = info.sha;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let fetch = |name: &str, on: &dyn DownloadProgress| {
        fetch_file(&client, id, repo_dir, &commit, name, on)
    };
    for side in ["config.json", "generation_config.json"] {
        if files.contains(&side) {
            fetch(side, progress)?;
        }
    }
    // Top-level files only: a weights file in a subfolder belongs to another model
    // (an `original/` checkpoint, a `gguf/` folder).
    let top_level: Vec<&str> = files.iter().copied().filter(|f| !f.contains('/')).collect();
    let weights: Vec<String> = if let Some(file) = &id.file {
        if !files.contains(&file.as_str()) {
            return Err(hub_error(
                id,
                format!(
                    "revision {} has no file `{file}`{}",
                    id.revision,
                    gguf_list(&files)
                ),
            ));
        }
        vec![file.clone()]
    } else {
        match formats::select(&top_level) {
            Some((_, Selected::Index(index))) => {
                fetch(&index, progress)?;
                shards_of(id, &snapshot.join(&index))?
            }
            Some((_, Selected::Files(files))) => files,
            Some((format, Selected::Ambiguous(several))) => {
                // A repo of GGUF quants: downloading all of them is never what is meant.
                return Err(hub_error(
                    id,
                    format!(
                        "revision {} holds several {} files ({}): name one as ORG/NAME:FILE{}",
                        id.revision,
                        format.name,
                        several.join(", "),
                        Path::new(&several[0])
                            .extension()
                            .map(|e| format!(".{}", e.to_string_lossy()))
                            .unwrap_or_default()
                    ),
                ));
            }
            None => {
                return Err(hub_error(
                    id,
                    format!(
                        "revision {} has no {}{}",
                        id.revision,
                        formats::expected_names(),
                        gguf_list(&files)
                    ),
                ));
            }
        }
    };
    for w in &weights {
        fetch(w, progress)?;
    }
    if id.revision != commit {
        let refs = repo_dir.join("refs").join(&id.revision);
        create_dir(refs.parent().expect("refs has a parent"))?;
        crate::fsio::write_atomic(&refs, commit.as_bytes())?;
    }
    Ok(HubOrigin {
        repo_id: id.repo.clone(),
        revision: id.revision.clone(),
        commit,
        snapshot,
    })
}

/// For a repo of GGUF files: which, and how to name one.
fn gguf_list(files: &[&str]) -> String {
    let ggufs: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| f.ends_with(".gguf"))
        .collect();
    if ggufs.is_empty() {
        return String::new();
    }
    format!(
        "; it holds GGUF files ({}): name one as ORG/NAME:FILE.gguf",
        ggufs.join(", ")
    )
}

/// The shard files an index names (already checked to stay inside the snapshot).
fn shards_of(id: &RepoId, index: &Path) -> Result<Vec<String>> {
    let dir = index.parent().expect("index is in the snapshot");
    let idx = crate::checkpoint::index::Index::read(index, dir)
        .map_err(|e| hub_error(id, e.to_string()))?;
    Ok(idx.files().into_iter().map(String::from).collect())
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create directory", e))
}

/// Percent-encodes each segment of a repo path, keeping the slashes.
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Fetches one file of a commit into `blobs/` and links it from `snapshots/COMMIT/`,
/// unless the snapshot already has it.
fn fetch_file(
    client: &Client<'_>,
    id: &RepoId,
    repo_dir: &Path,
    commit: &str,
    name: &str,
    progress: &dyn DownloadProgress,
) -> Result<()> {
    if name.starts_with('/')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(hub_error(id, format!("refusing file name `{name}`")));
    }
    let link = repo_dir.join("snapshots").join(commit).join(name);
    if link.is_file() {
        return Ok(());
    }
    let url = format!(
        "{}/{}/resolve/{commit}/{}",
        client.settings.endpoint,
        id.repo,
        encode_path(name)
    );
    let net = |e: ureq::Error| hub_error(id, format!("{name}: {e}"));
    let head = client.call(&url, true).map_err(net)?;
    let status = head.status().as_u16();
    if !(200..400).contains(&status) {
        return Err(client.status_error(id, name, status));
    }
    let header = |k: &str| {
        head.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let etag = header("x-linked-etag")
        .or_else(|| header("etag"))
        .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
        .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .ok_or_else(|| hub_error(id, format!("{name}: the hub sent no usable ETag")))?;
    let size: Option<u64> = header("x-linked-size")
        .or_else(|| header("content-length"))
        .and_then(|s| s.parse().ok());
    let blobs = repo_dir.join("blobs");
    create_dir(&blobs)?;
    let blob = blobs.join(&etag);
    if !blob.is_file() {
        // SLURM array tasks given the same hub id start together: one downloads each
        // blob while the others wait on its lock, then find it complete.
        // Lock files live where huggingface_hub keeps its own: CACHE/.locks/REPO/.
        let locks = repo_dir
            .parent()
            .expect("the repo is inside the cache")
            .join(".locks")
            .join(repo_dir.file_name().expect("repo folder"));
        create_dir(&locks)?;
        let lock_path = locks.join(format!("{etag}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, "cannot open lock file", e))?;
        lock.lock()
            .map_err(|e| Error::io(&lock_path, "cannot lock", e))?;
        if !blob.is_file() {
            fetch_blob(client, id, &url, name, size, &blob, progress)?;
        }
    }
    // snapshots/COMMIT/a/b.json -> ../../../blobs/ETAG (relative, as huggingface_hub),
    // made under a temporary name and renamed into place, so concurrent runs each see
    // either no link or a whole one.
    let depth = name.split('/').count() + 1;
    let target = PathBuf::from("../".repeat(depth)).join("blobs").join(&etag);
    let parent = link.parent().expect("link has a parent");
    create_dir(parent)?;
    let tmp = parent.join(format!(
        ".{}.{}.tmp",
        link.file_name().and_then(|n| n.to_str()).unwrap_or("link"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &link))
        .map_err(|e| Error::io(&link, "cannot link into the cache", e))
}

/// Downloads one file into `blob` through `BLOB.incomplete`, checking its size.
fn fetch_blob(
    client: &Client<'_>,
    id: &RepoId,
    url: &str,
    name: &str,
    size: Option<u64>,
    blob: &Path,
    progress: &dyn DownloadProgress,
) -> Result<()> {
    use std::io::{Read, Write};
    let net = |e: ureq::Error| hub_error(id, format!("{name}: {e}"));
    progress.start(name, size);
    tracing::info!(file = name, bytes = ?size, "downloading");
    let mut resp = client.call(url, false).map_err(net)?;
    if resp.status() != 200 {
        return Err(client.status_error(id, name, resp.status().as_u16()));
    }
    let partial = blob.with_extension("incomplete");
    let mut out =
        std::fs::File::create(&partial).map_err(|e| Error::io(&partial, "cannot create", e))?;
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| hub_error(id, format!("{name}: download interrupted: {e}")))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| Error::io(&partial, "cannot write", e))?;
        got += n as u64;
        progress.advance(n as u64);
    }
    if let Some(want) = size
        && got != want
    {
        return Err(hub_error(
            id,
            format!("{name}: received {got} bytes, expected {want}"),
        ));
    }
    out.sync_all()
        .map_err(|e| Error::io(&partial, "cannot write", e))?;
    std::fs::rename(&partial, blob).map_err(|e| Error::io(blob, "cannot rename", e))?;
    progress.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_ids() {
        let id = RepoId::parse("Qwen/Qwen3-0.6B").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("Qwen/Qwen3-0.6B", "main")
        );
        assert_eq!(id.folder(), "models--Qwen--Qwen3-0.6B");
        let id = RepoId::parse("meta-llama/Llama-3.1-8B@refs/pr/12").unwrap();
        assert_eq!(id.revision, "refs/pr/12");
        assert_eq!(id.to_string(), "meta-llama/Llama-3.1-8B@refs/pr/12");
        let id = RepoId::parse("unsloth/Qwen3-8B-GGUF@v2:Qwen3-8B-Q4_K_M.gguf").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str(), id.file.as_deref()),
            ("unsloth/Qwen3-8B-GGUF", "v2", Some("Qwen3-8B-Q4_K_M.gguf"))
        );
        assert_eq!(
            id.to_string(),
            "unsloth/Qwen3-8B-GGUF@v2:Qwen3-8B-Q4_K_M.gguf"
        );
        for bad in [
            "a/b:",
            "a/b:../x.gguf",
            "a/b:/etc/passwd",
            "a/b:x y.gguf",
            "model",
            "./a/b",
            "a/b/c",
            "../x",
            "/abs/path",
            "a/b@",
            "a/b@../x",
            "a--b/c",
            "a/.hidden",
            "a b/c",
        ] {
            assert!(RepoId::parse(bad).is_none(), "{bad} parsed");
        }
    }

    #[test]
    fn encodes_file_names() {
        assert_eq!(encode_path("a b/c+d.json"), "a%20b/c%2Bd.json");
    }
}
