//! Who may call the HTTP API (an adapter concern: `http.rs` uses it, [`crate::core::Host`] never
//! sees it). Every request but `GET /healthz` carries `Authorization: Bearer <token>`, one of:
//!
//! - an **admin token**: an opaque secret read at start from the systemd credential `admin-token`
//!   (`LoadCredential=`, the package generates `/etc/cocalc-project-host/admin-token`) and/or the
//!   root-only file `auth.admin_token_file`; one token per line. Only SHA-256 digests are kept and
//!   compared in constant time. Full access.
//! - a **master token**: a JWT signed with Ed25519 (`alg: EdDSA`) by the master, verified locally
//!   against `auth.master_public_keys`. Claims: `aud` = this host's id, `sub`, `exp` (at most
//!   `auth.max_token_lifetime` ahead), optional `iat`/`nbf`/`iss`/`jti`, and
//!   `scope: {projects: [ids] | "*", actions: ["list"|"status"|"start"|"stop", …]}`. When
//!   `auth.master_issuer` is set, `iss` must equal it (a token without `iss` is refused). A token
//!   whose `jti` the master revoked (`POST /auth/revoked`, [`crate::auth::revocation`]) is refused with
//!   `token_revoked`. A claim or
//!   scope field this host does not know makes the token invalid (it might be a restriction); an
//!   action name it does not know grants nothing.
//!
//! JWT parsing and claim validation are `jsonwebtoken`'s; the signature check is `ed25519-dalek`'s
//! `verify_strict`, plugged in as an EdDSA-only crypto provider (no other algorithm exists here).
//! Tokens are never logged.
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Once;

use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::signature::{Signer, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::project::ProjectId;

pub mod fleet;
pub mod revocation;
mod settings;
pub use settings::{AuthFragment, AuthSettings};

/// Name of the systemd credential holding admin tokens (`LoadCredential=admin-token:…`).
pub const CREDENTIAL: &str = "admin-token";
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 30;
/// Longest bearer token looked at.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Shortest admin token accepted in a token file.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// What a request does, as far as permissions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// `GET /projects` (the answer holds only the projects in scope)
    List,
    /// `GET /projects/:id/status`
    Status,
    /// `POST /projects/:id/start`
    Start,
    /// `POST /projects/:id/stop`
    Stop,
    /// `GET`/`PATCH /projects/:id/config`, `POST /projects/:id/quota` (limits and quota)
    Config,
    /// `…/snapshots…` (list, create, delete, restore a project's snapshots)
    Snapshot,
    /// `POST /auth/revoked` (push revoked token ids; host-wide, no project)
    Revoke,
    /// `GET`/`PUT /projects/:id/authorized-keys` (who may SSH into the project)
    SshKeys,
    /// host-wide operations (`POST /snapshots/sweep`): admin tokens only, never in a scope
    Admin,
    /// the proxy into a running project (`/<id>/port/<p>/…`, `/<id>/server/<p>/…`)
    Proxy,
    /// the project's files (`/<id>/files/<path>`)
    Files,
    /// `GET /host` (the host's id, capacity, counts and master link; host-wide, no project)
    Host,
    /// `DELETE /projects/:id` (stop, then delete its home and snapshots)
    Delete,
    /// `GET /projects/:id/logs` (the project's journal)
    Logs,
    /// `GET /metrics` (host-wide, no project)
    Metrics,
    /// Moving the project between hosts: on the source `POST /projects/:id/move` and its
    /// operation; on the target `POST /projects/:id/receive/:move` (the token's `aud` is the
    /// target host: a token for one target is refused by every other host)
    Move,
}

impl Action {
    /// Every action, in wire order.
    /// (`Admin` is not one: no master token can grant it.)
    pub const ALL: [Action; 15] = [
        Action::List,
        Action::Status,
        Action::Start,
        Action::Stop,
        Action::Config,
        Action::Snapshot,
        Action::Revoke,
        Action::SshKeys,
        Action::Proxy,
        Action::Files,
        Action::Host,
        Action::Delete,
        Action::Logs,
        Action::Metrics,
        Action::Move,
    ];

    /// The name used in a token's `scope.actions`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::List => "list",
            Action::Status => "status",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Config => "config",
            Action::Snapshot => "snapshot",
            Action::Revoke => "revoke",
            Action::SshKeys => "ssh_keys",
            Action::Admin => "admin",
            Action::Proxy => "proxy",
            Action::Files => "files",
            Action::Host => "host",
            Action::Delete => "delete",
            Action::Logs => "logs",
            Action::Metrics => "metrics",
            Action::Move => "move",
        }
    }

    /// Parses a scope action name; `None` for names this host does not know.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// The projects a master token covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Projects {
    /// `"*"`: every project on this host.
    All,
    /// These projects only.
    Only(BTreeSet<ProjectId>),
}

/// What a master token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Which projects.
    pub projects: Projects,
    /// Which actions on them.
    pub actions: BTreeSet<Action>,
}

/// Who is calling, once the token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Holder of an admin token: everything.
    Admin,
    /// Holder of a master token: what its scope says.
    Master {
        /// the token's `sub`
        sub: String,
        /// the token's scope
        scope: Scope,
    },
}

impl Principal {
    /// Whether `action` (on `project`, when it is about one) is allowed.
    pub fn allows(&self, action: Action, project: Option<&ProjectId>) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Master { scope, .. } => {
                scope.actions.contains(&action)
                    && match project {
                        Some(id) => covers(&scope.projects, id),
                        None => matches!(
                            action,
                            Action::List | Action::Revoke | Action::Host | Action::Metrics
                        ),
                    }
            }
        }
    }

    /// Whether `id` may appear in answers (the project list) to this caller.
    pub fn sees(&self, id: &ProjectId) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Master { scope, .. } => covers(&scope.projects, id),
        }
    }

    /// A name for logs: `admin` or `master:<sub>`.
    pub fn name(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::Master { sub, .. } => format!("master:{sub}"),
        }
    }
}

fn covers(p: &Projects, id: &ProjectId) -> bool {
    match p {
        Projects::All => true,
        Projects::Only(set) => set.contains(id),
    }
}

/// A token that checked out, with what the proxy's cookie needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// who it is
    pub principal: Principal,
    /// the token's `exp` (unix seconds); `None` for admin tokens
    pub exp: Option<u64>,
    /// the token's `jti`, if it has one
    pub jti: Option<String>,
}

/// Why a request is not authenticated (→ 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No `Authorization` header.
    #[error("missing Authorization: Bearer <token>")]
    Missing,
    /// The header is not `Bearer <token>`.
    #[error("malformed Authorization header: {0}")]
    Malformed(&'static str),
    /// The token is not valid here.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The master revoked this token (its `jti`).
    #[error("token revoked: its jti is on this host's revocation list")]
    Revoked,
}

impl Denied {
    /// The machine code of the error answer.
    pub fn code(&self) -> &'static str {
        match self {
            Denied::Missing | Denied::Malformed(_) => "unauthorized",
            Denied::Invalid(_) => "invalid_token",
            Denied::Revoked => "token_revoked",
        }
    }
}

/// Why the auth setup could not be loaded (the daemon refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A token file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// the file
        path: PathBuf,
        /// why
        source: std::io::Error,
    },
    /// A token file or a key is not acceptable.
    #[error("{what}: {message}")]
    Invalid {
        /// the file or config key
        what: String,
        /// what is wrong
        message: String,
    },
}

/// The claims of a master token, exactly (unknown claims are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Claims {
    /// checked by jsonwebtoken (`Validation::set_audience`)
    #[allow(dead_code)]
    aud: serde_json::Value,
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    /// checked by jsonwebtoken (`validate_nbf`)
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<u64>,
    /// checked by jsonwebtoken (`Validation::set_issuer`) when `auth.master_issuer` is set
    #[serde(default)]
    #[allow(dead_code)]
    iss: Option<String>,
    #[serde(default)]
    jti: Option<String>,
    scope: RawScope,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    projects: RawProjects,
    actions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawProjects {
    Star(String),
    List(Vec<String>),
}

/// Turns a token's scope into a [`Scope`]: project ids must be canonical; `"*"` is all projects.
fn scope_of(raw: RawScope) -> Result<Scope, String> {
    let projects = match raw.projects {
        RawProjects::Star(s) if s == "*" => Projects::All,
        RawProjects::Star(s) => {
            return Err(format!(
                "scope.projects must be a list of ids or \"*\", not {:?}",
                s.chars().take(40).collect::<String>()
            ));
        }
        RawProjects::List(ids) => Projects::Only(
            ids.iter()
                .map(|s| {
                    s.parse::<ProjectId>()
                        .map_err(|e| format!("scope.projects: {e}"))
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let actions = raw
        .actions
        .iter()
        .filter_map(|a| Action::parse(a))
        .collect();
    Ok(Scope { projects, actions })
}

/// Bounded lifetime: `exp` at most `max_lifetime` ahead of now (and of `iat`), `iat` not in the
/// future. (`exp` in the past and `nbf` in the future are jsonwebtoken's checks.)
fn check_lifetime(exp: u64, iat: Option<u64>, now: u64, max_lifetime: u64) -> Result<(), String> {
    if exp > now.saturating_add(max_lifetime).saturating_add(LEEWAY_SECS) {
        return Err(format!(
            "exp is more than {max_lifetime}s ahead (auth.max_token_lifetime)"
        ));
    }
    if let Some(iat) = iat {
        if iat > now.saturating_add(LEEWAY_SECS) {
            return Err("iat is in the future".into());
        }
        if exp.saturating_sub(iat) > max_lifetime {
            return Err(format!(
                "lifetime exp - iat is more than {max_lifetime}s (auth.max_token_lifetime)"
            ));
        }
    }
    Ok(())
}

/// The verifier of bearer tokens.
pub struct Auth {
    admin: Vec<[u8; 32]>,
    keys: Vec<DecodingKey>,
    validation: Validation,
    max_lifetime: u64,
    revoked: crate::auth::revocation::Revocations,
    /// the master's own key set from its register answer (`fleet`): when set, used instead
    /// of `keys`
    fleet_keys: std::sync::Arc<std::sync::RwLock<Option<Vec<DecodingKey>>>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("admin_tokens", &self.admin.len())
            .field("master_keys", &self.keys.len())
            .field("max_lifetime", &self.max_lifetime)
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Auth {
    /// A verifier accepting `admin_tokens` and master tokens for audience `host_id` signed by any
    /// of `master_keys` (from [`parse_public_key`]).
    pub fn new(
        admin_tokens: &[String],
        master_keys: Vec<DecodingKey>,
        host_id: &str,
        max_lifetime_secs: u64,
    ) -> Auth {
        install_provider();
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[host_id]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        Auth {
            admin: admin_tokens.iter().map(|t| digest(t.as_bytes())).collect(),
            keys: master_keys,
            validation,
            max_lifetime: max_lifetime_secs,
            revoked: crate::auth::revocation::Revocations::default(),
            fleet_keys: Default::default(),
        }
    }

    /// Accepts master tokens only with `iss` = `issuer` (none: `iss` is not checked).
    pub fn with_issuer(mut self, issuer: Option<&str>) -> Auth {
        if let Some(iss) = issuer {
            self.validation.set_issuer(&[iss]);
            self.validation
                .set_required_spec_claims(&["exp", "aud", "sub", "iss"]);
        }
        self
    }

    /// Refuses master tokens whose `jti` is on `revoked` (shared: later pushes count).
    pub fn with_revocations(mut self, revoked: crate::auth::revocation::Revocations) -> Auth {
        self.revoked = revoked;
        self
    }

    /// The revocation list this verifier consults.
    pub fn revocations(&self) -> &crate::auth::revocation::Revocations {
        &self.revoked
    }

    /// The longest lifetime of a token accepted (seconds), [`LEEWAY_SECS`] included: how long a
    /// revoked id must be kept.
    pub fn max_lifetime_secs(&self) -> u64 {
        self.max_lifetime.saturating_add(LEEWAY_SECS)
    }

    /// Loads the admin tokens (credential `admin-token` in `$CREDENTIALS_DIRECTORY`, then
    /// `auth.admin_token_file`) and the master keys of the settings.
    pub fn load(settings: &AuthSettings, host_id: &str) -> Result<Auth, SetupError> {
        let mut tokens = Vec::new();
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let p = Path::new(&dir).join(CREDENTIAL);
            if p.exists() {
                tokens.extend(read_token_file(&p, false)?);
            }
        }
        if let Some(p) = &settings.admin_token_file {
            tokens.extend(read_token_file(p, true)?);
        }
        let keys = settings
            .master_public_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                parse_public_key(k).map_err(|message| SetupError::Invalid {
                    what: format!("auth.master_public_keys[{i}]"),
                    message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Auth::new(
            &tokens,
            keys,
            host_id,
            settings.max_token_lifetime.as_secs(),
        )
        .with_issuer(settings.master_issuer.as_deref()))
    }

    /// Replaces the configured master keys by the master's own set (`auth::fleet`).
    pub fn set_fleet_keys(&self, keys: Vec<DecodingKey>) {
        *self.fleet_keys.write().unwrap_or_else(|p| p.into_inner()) = Some(keys);
    }

    /// How many admin tokens and master keys are configured (for the startup log line).
    pub fn counts(&self) -> (usize, usize) {
        (self.admin.len(), self.keys.len())
    }

    /// Authenticates the value of an `Authorization` header.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Principal, Denied> {
        let h = header.ok_or(Denied::Missing)?;
        let token = bearer(h)?;
        self.verify(token, now_secs())
    }

    /// Checks a bearer token as of `now` (unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Principal, Denied> {
        self.verify_token(token, now).map(|v| v.principal)
    }

    /// Checks a bearer token as of `now`, with its expiry and `jti` (the proxy's cookie keeps
    /// both: it expires with the token and dies with its revocation).
    pub fn verify_token(&self, token: &str, now: u64) -> Result<Verified, Denied> {
        // every admin digest is compared, without stopping at a match
        let d = digest(token.as_bytes());
        let admin = self
            .admin
            .iter()
            .fold(subtle::Choice::from(0), |acc, a| acc | a.ct_eq(&d));
        if bool::from(admin) {
            return Ok(Verified {
                principal: Principal::Admin,
                exp: None,
                jti: None,
            });
        }
        if token.bytes().filter(|b| *b == b'.').count() != 2 {
            return Err(Denied::Invalid("not a known admin token nor a JWT".into()));
        }
        let fleet = self.fleet_keys.read().unwrap_or_else(|p| p.into_inner());
        let keys = fleet.as_deref().unwrap_or(&self.keys);
        if keys.is_empty() {
            return Err(Denied::Invalid(
                "master tokens are not accepted: no auth.master_public_keys".into(),
            ));
        }
        let mut last = Denied::Invalid("no key".into());
        for key in keys {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => {
                    let c = data.claims;
                    check_lifetime(c.exp, c.iat, now, self.max_lifetime)
                        .map_err(Denied::Invalid)?;
                    if let Some(j) = &c.jti
                        && self.revoked.is_revoked(j, now)
                    {
                        return Err(Denied::Revoked);
                    }
                    let scope = scope_of(c.scope).map_err(Denied::Invalid)?;
                    return Ok(Verified {
                        principal: Principal::Master { sub: c.sub, scope },
                        exp: Some(c.exp),
                        jti: c.jti,
                    });
                }
                // another key may have signed it; anything else is final
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    last = Denied::Invalid(describe(&e));
                }
                Err(e) => return Err(Denied::Invalid(describe(&e))),
            }
        }
        Err(last)
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    match e.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => "wrong audience (aud is not this host's id)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer (iss is not auth.master_issuer)".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm => "algorithm must be EdDSA".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("claim {c} is missing"),
        // serde's message names the claim; it never contains the token
        ErrorKind::Json(j) => format!("bad claims: {j}"),
        _ => "malformed token".into(),
    }
}

/// Extracts the token of `Bearer <token>`.
fn bearer(h: &[u8]) -> Result<&str, Denied> {
    if h.len() > MAX_TOKEN_LEN + 7 {
        return Err(Denied::Malformed("too long"));
    }
    let s = std::str::from_utf8(h).map_err(|_| Denied::Malformed("not UTF-8"))?;
    let (scheme, token) = s
        .split_once(' ')
        .ok_or(Denied::Malformed("expected Bearer <token>"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denied::Malformed("scheme must be Bearer"));
    }
    let token = token.trim_matches(' ');
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Denied::Malformed("expected Bearer <token>"));
    }
    Ok(token)
}

/// Reads admin tokens, one per line (blank lines and `#` comments skipped). A file named in the
/// config must belong to the daemon's user and be unreadable by others.
pub fn read_token_file(path: &Path, check_owner: bool) -> Result<Vec<String>, SetupError> {
    let invalid = |message: String| SetupError::Invalid {
        what: path.display().to_string(),
        message,
    };
    if check_owner {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).map_err(|source| SetupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o077 != 0 {
            return Err(invalid(format!(
                "must be owned by uid {} with mode 0600 or stricter (it is uid {} mode {:o})",
                nix::unistd::geteuid(),
                m.uid(),
                m.mode() & 0o7777
            )));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|source| SetupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_tokens(&text).map_err(invalid)
}

/// The tokens of a token file's text.
pub fn parse_tokens(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.len() < MIN_ADMIN_TOKEN_LEN
            || t.len() > MAX_TOKEN_LEN
            || !t.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!(
                "line {}: a token is {MIN_ADMIN_TOKEN_LEN} to {MAX_TOKEN_LEN} printable ASCII characters without spaces",
                i + 1
            ));
        }
        out.push(t.to_owned());
    }
    Ok(out)
}

/// Parses an Ed25519 public key: PEM (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey -pubout`
/// writes) or the 32 raw bytes in base64/base64url (a JWK's `x`).
pub fn parse_public_key(s: &str) -> Result<DecodingKey, String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let s = s.trim();
    let raw: Vec<u8> = if s.starts_with("-----BEGIN") {
        DecodingKey::from_ed_pem(s.as_bytes())
            .map_err(|e| format!("not an Ed25519 public key in PEM: {e}"))?
            .try_get_as_bytes()
            .map_err(|e| e.to_string())?
            .to_vec()
    } else {
        STANDARD
            .decode(s)
            .or_else(|_| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')))
            .map_err(|_| "neither PEM nor base64".to_string())?
    };
    let bytes: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| format!("an Ed25519 public key is 32 bytes, this is {}", raw.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid Ed25519 point".to_string())?;
    Ok(DecodingKey::from_ed_der(&bytes))
}

/// Signs `claims` as a master token with an Ed25519 key (its 32-byte seed or PKCS#8 DER). For
/// tests and tools: the master signs its own tokens.
pub fn sign(key: &[u8], claims: &serde_json::Value) -> Result<String, String> {
    install_provider();
    jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        claims,
        &EncodingKey::from_ed_der(key),
    )
    .map_err(|e| e.to_string())
}

// --- the EdDSA-only crypto provider for jsonwebtoken ---

static EDDSA_ONLY: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

fn install_provider() {
    static ONCE: Once = Once::new();
    // Err: a provider is installed already (jsonwebtoken built with a crypto feature elsewhere)
    ONCE.call_once(|| {
        let _ = CryptoProvider::install_default(&EDDSA_ONLY);
    });
}

struct EdSigner(SigningKey);

impl Signer<Vec<u8>> for EdSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, jsonwebtoken::signature::Error> {
        Ok(ed25519_dalek::Signer::sign(&self.0, msg)
            .to_bytes()
            .to_vec())
    }
}

impl JwtSigner for EdSigner {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

struct EdVerifier(VerifyingKey);

impl Verifier<Vec<u8>> for EdVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), jsonwebtoken::signature::Error> {
        let sig = Signature::from_slice(sig).map_err(|_| jsonwebtoken::signature::Error::new())?;
        self.0
            .verify_strict(msg, &sig)
            .map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtVerifier for EdVerifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

fn new_signer(
    alg: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    if *alg != Algorithm::EdDSA {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let b = key.as_bytes();
    let sk = match <&[u8; 32]>::try_from(b) {
        Ok(seed) => SigningKey::from_bytes(seed),
        Err(_) => SigningKey::from_pkcs8_der(b).map_err(|_| ErrorKind::InvalidEddsaKey)?,
    };
    Ok(Box::new(EdSigner(sk)))
}

fn new_verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    if *alg != Algorithm::EdDSA {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let b: &[u8; 32] = key
        .try_get_as_bytes()?
        .try_into()
        .map_err(|_| ErrorKind::InvalidEddsaKey)?;
    let vk = VerifyingKey::from_bytes(b).map_err(|_| ErrorKind::InvalidEddsaKey)?;
    Ok(Box::new(EdVerifier(vk)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOST: &str = "0b7e5b8e-1111-4222-8333-444455556666";
    const A: &str = "6f1c2d3e-0000-4000-8000-00000000000a";
    const B: &str = "6f1c2d3e-0000-4000-8000-00000000000b";
    const SEED: [u8; 32] = [7; 32];
    const ADMIN: &str = "s3cr3t-admin-token-0123456789";

    fn pubkey(seed: &[u8; 32]) -> DecodingKey {
        use base64::Engine as _;
        let vk = SigningKey::from_bytes(seed).verifying_key();
        parse_public_key(&base64::engine::general_purpose::STANDARD.encode(vk.to_bytes())).unwrap()
    }

    fn auth() -> Auth {
        Auth::new(&[ADMIN.to_string()], vec![pubkey(&SEED)], HOST, 3600)
    }

    fn claims(now: u64) -> serde_json::Value {
        json!({"aud": HOST, "sub": "account-1", "iat": now, "exp": now + 600,
               "scope": {"projects": [A], "actions": ["status", "start"]}})
    }

    fn tok(c: &serde_json::Value) -> String {
        sign(&SEED, c).unwrap()
    }

    fn id(s: &str) -> ProjectId {
        s.parse().unwrap()
    }

    #[test]
    fn admin_token_is_admin() {
        let a = auth();
        assert_eq!(a.verify(ADMIN, now_secs()), Ok(Principal::Admin));
        assert!(matches!(
            a.verify("s3cr3t-admin-token-012345678", now_secs()),
            Err(Denied::Invalid(_))
        ));
        let h = format!("Bearer {ADMIN}");
        assert_eq!(a.authenticate(Some(h.as_bytes())), Ok(Principal::Admin));
        let h = format!("bearer  {ADMIN}");
        assert_eq!(a.authenticate(Some(h.as_bytes())), Ok(Principal::Admin));
    }

    #[test]
    fn headers_that_are_not_bearer_tokens_are_refused() {
        let a = auth();
        assert_eq!(a.authenticate(None), Err(Denied::Missing));
        for h in [
            &b"Basic dXNlcjpwdw=="[..],
            b"Bearer",
            b"Bearer ",
            b"Bearer a b",
            b"\xff\xfe",
            ADMIN.as_bytes(),
        ] {
            assert!(
                matches!(a.authenticate(Some(h)), Err(Denied::Malformed(_))),
                "{h:?}"
            );
        }
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert!(a.authenticate(Some(long.as_bytes())).is_err());
    }

    #[test]
    fn master_token_is_scoped_to_its_projects_and_actions() {
        let now = now_secs();
        let p = auth().verify(&tok(&claims(now)), now).unwrap();
        let Principal::Master { sub, scope } = &p else {
            panic!("{p:?}")
        };
        assert_eq!(sub, "account-1");
        assert_eq!(
            scope.actions,
            [Action::Status, Action::Start].into_iter().collect()
        );
        assert!(p.allows(Action::Status, Some(&id(A))));
        assert!(p.allows(Action::Start, Some(&id(A))));
        assert!(!p.allows(Action::Stop, Some(&id(A))), "stop not granted");
        assert!(!p.allows(Action::Status, Some(&id(B))), "other project");
        assert!(!p.allows(Action::Start, Some(&id(B))), "other project");
        assert!(!p.allows(Action::List, None), "list not granted");
        assert!(p.sees(&id(A)) && !p.sees(&id(B)));
        assert_eq!(p.name(), "master:account-1");
        assert!(Principal::Admin.allows(Action::Stop, Some(&id(B))));
    }

    #[test]
    fn star_scope_and_list() {
        let now = now_secs();
        let mut c = claims(now);
        c["scope"] = json!({"projects": "*", "actions": ["list", "stop", "snapshot"]});
        let p = auth().verify(&tok(&c), now).unwrap();
        assert!(p.allows(Action::List, None));
        assert!(p.allows(Action::Stop, Some(&id(B))));
        assert!(!p.allows(Action::Start, Some(&id(B))));
        assert!(p.sees(&id(B)));
        // a non-list action is never allowed without a project
        assert!(!p.allows(Action::Stop, None));
    }

    #[test]
    fn expired_future_and_overlong_tokens_are_invalid() {
        let now = now_secs();
        let a = auth();
        let check = |c: serde_json::Value, want: &str| {
            let e = a.verify(&tok(&c), now).unwrap_err();
            assert!(e.to_string().contains(want), "{e} (want {want})");
            assert_eq!(e.code(), "invalid_token");
        };
        let mut c = claims(now);
        c["exp"] = json!(now - 120);
        c["iat"] = json!(now - 600);
        check(c, "expired");
        let mut c = claims(now);
        c["exp"] = json!(now + 86400);
        check(c, "max_token_lifetime");
        let mut c = claims(now);
        c["iat"] = json!(now + 600);
        c["exp"] = json!(now + 700);
        check(c, "future");
        let mut c = claims(now);
        c["nbf"] = json!(now + 600);
        check(c, "nbf");
        // within the leeway is fine
        let mut c = claims(now);
        c["exp"] = json!(now - 5);
        assert!(a.verify(&tok(&c), now).is_ok());
    }

    #[test]
    fn wrong_audience_missing_claims_and_unknown_claims_are_invalid() {
        let now = now_secs();
        let a = auth();
        let check = |c: serde_json::Value, want: &str| {
            let e = a.verify(&tok(&c), now).unwrap_err();
            assert!(e.to_string().contains(want), "{e} (want {want})");
        };
        let mut c = claims(now);
        c["aud"] = json!("another-host");
        check(c, "audience");
        let mut c = claims(now);
        c["aud"] = json!(["another-host", HOST]);
        assert!(a.verify(&tok(&c), now).is_ok(), "aud list holding us");
        for k in ["aud", "exp", "sub"] {
            let mut c = claims(now);
            c.as_object_mut().unwrap().remove(k);
            check(c, k);
        }
        let mut c = claims(now);
        c.as_object_mut().unwrap().remove("scope");
        check(c, "scope");
        let mut c = claims(now);
        c["admin"] = json!(true);
        check(c, "admin");
        let mut c = claims(now);
        c["scope"]["read_only"] = json!(true);
        check(c, "read_only");
        let mut c = claims(now);
        c["scope"]["projects"] = json!(["../../etc"]);
        check(c, "invalid project id");
        let mut c = claims(now);
        c["scope"]["projects"] = json!("all");
        check(c, "scope.projects");
        let mut c = claims(now);
        c["exp"] = json!("tomorrow");
        check(c, "exp");
    }

    #[test]
    fn tampered_or_foreign_tokens_are_invalid() {
        let now = now_secs();
        let a = auth();
        let t = tok(&claims(now));
        // flip one character of the signature
        let mut bytes = t.clone().into_bytes();
        let i = bytes.len() - 5;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let e = a
            .verify(std::str::from_utf8(&bytes).unwrap(), now)
            .unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        // other claims under the original signature
        let (h, rest) = t.split_once('.').unwrap();
        let (_, s) = rest.split_once('.').unwrap();
        let mut c = claims(now);
        c["scope"]["projects"] = json!([A, B]);
        let forged = tok(&c);
        let p2 = forged.split('.').nth(1).unwrap();
        let e = a.verify(&format!("{h}.{p2}.{s}"), now).unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        // signed by another key: a well-formed EdDSA token whose signature does not verify
        let other = sign(&[9; 32], &claims(now)).unwrap();
        let e = a.verify(&other, now).unwrap_err();
        assert_eq!(e.code(), "invalid_token");
        assert!(e.to_string().ends_with(": bad signature"), "{e}");
        // alg none / HS256 headers over the valid claims, with the real signature or none
        let p = t.split('.').nth(1).unwrap();
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS256","typ":"JWT"}"#,
        ] {
            let h = b64(header.as_bytes());
            for token in [format!("{h}.{p}.{s}"), format!("{h}.{p}.")] {
                let e = a.verify(&token, now).unwrap_err();
                assert_eq!(e.code(), "invalid_token", "{header}");
                let want = if header.contains("none") {
                    // not an algorithm jsonwebtoken knows: the header itself is refused
                    "unknown variant `none`"
                } else {
                    "algorithm must be EdDSA"
                };
                assert!(e.to_string().contains(want), "{header}: {e} (want {want})");
            }
        }
        // HS256 keyed with the public key, in each form it is published (raw, base64, PEM):
        // the classic algorithm confusion; a correct HMAC, refused for its algorithm
        use base64::Engine as _;
        let raw = SigningKey::from_bytes(&SEED).verifying_key().to_bytes();
        let b64_key = base64::engine::general_purpose::STANDARD.encode(raw);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(
                [
                    &[
                        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00
                    ][..],
                    &raw
                ]
                .concat()
            )
        );
        assert!(parse_public_key(&pem).is_ok(), "the PEM form is the key's");
        let h = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
        for secret in [&raw[..], b64_key.as_bytes(), pem.as_bytes()] {
            let mac = hmac_sha256(secret, format!("{h}.{p}").as_bytes());
            let e = a
                .verify(&format!("{h}.{p}.{}", b64(&mac)), now)
                .unwrap_err();
            assert_eq!(e.code(), "invalid_token");
            assert!(e.to_string().ends_with(": algorithm must be EdDSA"), "{e}");
        }
        // no master keys: JWTs are refused outright
        let none = Auth::new(&[ADMIN.to_string()], vec![], HOST, 3600);
        let e = none.verify(&t, now).unwrap_err();
        assert!(e.to_string().contains("no auth.master_public_keys"), "{e}");
    }

    fn b64(b: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// HMAC-SHA256 (RFC 2104), only to forge HS256 tokens here: the daemon has no HMAC at all.
    fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
        let inner = Sha256::digest([pad(0x36).as_slice(), msg].concat());
        Sha256::digest([pad(0x5c).as_slice(), inner.as_slice()].concat()).to_vec()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // test case 2 of RFC 4231: the forging helper above is a real HMAC
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_second_key_verifies_tokens_of_a_rotated_master() {
        let now = now_secs();
        let a = Auth::new(&[], vec![pubkey(&[1; 32]), pubkey(&SEED)], HOST, 3600);
        assert!(a.verify(&tok(&claims(now)), now).is_ok());
        assert!(a.verify(ADMIN, now).is_err(), "no admin tokens configured");
    }

    #[test]
    fn public_keys_parse_from_pem_and_base64() {
        // openssl genpkey -algorithm ed25519 | openssl pkey -pubout
        let pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        assert!(parse_public_key(pem).is_ok());
        assert!(parse_public_key("Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=").is_ok());
        assert!(parse_public_key("Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE").is_ok());
        assert!(
            parse_public_key("c2hvcnQ=")
                .unwrap_err()
                .contains("32 bytes")
        );
        assert!(parse_public_key("not base64 !").is_err());
        assert!(
            parse_public_key("-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----").is_err()
        );
    }

    #[test]
    fn token_files() {
        assert_eq!(
            parse_tokens("# admin\n\n  aaaaaaaaaaaaaaaaaaaa  \nbbbbbbbbbbbbbbbbbbbb\n").unwrap(),
            ["aaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbb"]
        );
        assert!(parse_tokens("short\n").unwrap_err().contains("line 1"));
        assert!(parse_tokens("aaaaaaaa aaaaaaaaaaaa\n").is_err());
        assert!(parse_tokens("").unwrap().is_empty());
        let dir = std::env::temp_dir().join(format!("cph-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("admin-token");
        std::fs::write(&f, "cccccccccccccccccccccccc\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token_file(&f, true).unwrap_err().to_string();
        assert!(e.contains("0600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&f, true).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_issuer_is_checked_when_configured() {
        let now = now_secs();
        let a = auth().with_issuer(Some("https://master.example"));
        let mut c = claims(now);
        c["iss"] = json!("https://master.example");
        assert!(a.verify(&tok(&c), now).is_ok());
        c["iss"] = json!("https://other.example");
        let e = a.verify(&tok(&c), now).unwrap_err();
        assert_eq!(
            e,
            Denied::Invalid("wrong issuer (iss is not auth.master_issuer)".into())
        );
        assert_eq!(e.code(), "invalid_token");
        let e = a.verify(&tok(&claims(now)), now).unwrap_err();
        assert_eq!(e, Denied::Invalid("claim iss is missing".into()));
        // unset: any iss, or none
        assert!(auth().verify(&tok(&c), now).is_ok());
        assert!(
            auth()
                .with_issuer(None)
                .verify(&tok(&claims(now)), now)
                .is_ok()
        );
        // admin tokens have no claims
        assert_eq!(a.verify(ADMIN, now), Ok(Principal::Admin));
    }

    #[tokio::test]
    async fn revoked_jtis_are_refused_with_their_own_code() {
        let now = now_secs();
        let dir = std::env::temp_dir().join(format!("cph-auth-revoke-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let _ = std::fs::remove_file(&path);
        let store = crate::backends::sqlite::Store::open(&path).unwrap();
        let revoked = crate::auth::revocation::Revocations::load(store, now)
            .await
            .unwrap();
        let a = auth().with_revocations(revoked.clone());
        let mut c = claims(now);
        c["jti"] = json!("tok-1");
        let t1 = tok(&c);
        c["jti"] = json!("tok-2");
        let t2 = tok(&c);
        assert!(a.verify(&t1, now).is_ok());
        let ids = crate::auth::revocation::parse_list(&["tok-1".into()]).unwrap();
        revoked
            .revoke(ids, now, now + a.max_lifetime_secs())
            .await
            .unwrap();
        let e = a.verify(&t1, now).unwrap_err();
        assert_eq!(e, Denied::Revoked);
        assert_eq!(e.code(), "token_revoked");
        assert!(a.verify(&t2, now).is_ok(), "another jti");
        assert!(a.verify(&tok(&claims(now)), now).is_ok(), "no jti");
        assert_eq!(a.verify(ADMIN, now), Ok(Principal::Admin));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn revoke_is_a_host_wide_action() {
        let now = now_secs();
        let mut c = claims(now);
        c["scope"] = json!({"projects": [], "actions": ["revoke"]});
        let p = auth().verify(&tok(&c), now).unwrap();
        assert!(p.allows(Action::Revoke, None));
        assert!(!p.allows(Action::List, None));
        assert!(!p.allows(Action::Admin, None));
        let p = auth().verify(&tok(&claims(now)), now).unwrap();
        assert!(!p.allows(Action::Revoke, None), "not granted");
        assert_eq!(Action::parse("revoke"), Some(Action::Revoke));
    }

    #[test]
    fn lifetime_bounds() {
        assert!(check_lifetime(1000, None, 1000, 60).is_ok());
        assert!(check_lifetime(1090, None, 1000, 60).is_ok(), "leeway");
        assert!(check_lifetime(1091, None, 1000, 60).is_err());
        assert!(check_lifetime(1050, Some(1000), 1000, 60).is_ok());
        assert!(check_lifetime(1070, Some(1000), 1000, 60).is_err());
        assert!(check_lifetime(u64::MAX, Some(0), u64::MAX, u64::MAX).is_ok());
        assert!(check_lifetime(u64::MAX, None, 0, 60).is_err());
    }
}
