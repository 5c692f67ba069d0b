//! az-like admin verbs. They talk to the control plane over HTTPS with a bearer token from
//! our token service (client-credentials grant with the admin service principal).

use crate::CliError;
use clap::{Args, Subcommand, ValueEnum};
use keyless_node::upstream;
use keyless_ops::failover::Endpoints;
use serde_json::{json, Value};
use std::path::PathBuf;

const RESOURCES_API: &str = "2024-11-01";
const MSI_API: &str = "2023-01-31";
const COMPUTE_API: &str = "2024-11-01";

#[derive(Clone, Copy, ValueEnum, Default)]
pub enum Output {
    #[default]
    Json,
    Table,
    Tsv,
    None,
}

/// Connection options shared by the admin verbs. Defaults come from the environment, then
/// from `<data-dir>/endpoints.json` written by `keyless up`.
#[derive(Args, Clone)]
pub struct Conn {
    /// Server base URL. Several replicas: repeat the flag or separate URLs with commas; each
    /// request goes to the one that answered last and fails over to the next, in order, when
    /// it cannot answer (no connection, a timeout, 502/503/504).
    #[arg(long, env = "KEYLESS_SERVER", global = true, value_delimiter = ',')]
    server: Vec<String>,
    #[arg(long = "tenant", env = "KEYLESS_TENANT_ID", global = true)]
    tenant: Option<String>,
    #[arg(long, env = "KEYLESS_CLIENT_ID", global = true)]
    client_id_admin: Option<String>,
    #[arg(
        long,
        env = "KEYLESS_CLIENT_SECRET",
        global = true,
        hide_env_values = true
    )]
    client_secret: Option<String>,
    #[arg(long, env = "KEYLESS_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    #[arg(
        long,
        env = "KEYLESS_DATA_DIR",
        default_value = ".keyless",
        global = true
    )]
    data_dir: PathBuf,
    /// Subscription id (default: the one of the tenant).
    #[arg(long, env = "KEYLESS_SUBSCRIPTION_ID", global = true)]
    subscription: Option<String>,
    /// Output format [default: json; `aks pod-identity explain`: text].
    #[arg(short = 'o', long, value_enum, global = true)]
    output: Option<Output>,
    /// JMESPath query of the output (the subset az scripts use: `a.b`, `a[0]`, `a[*].b`,
    /// `[a, b]`), e.g. `--query nodeResourceGroup -o tsv`.
    #[arg(long, global = true)]
    query: Option<String>,
}

/// `(client id, secret)` from `<data-dir>/bootstrap-admin.secret` (env-file lines).
fn bootstrap_admin(data_dir: &std::path::Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(data_dir.join(crate::run::BOOTSTRAP_SECRET_FILE)).ok()?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(k)?.strip_prefix('='))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    Some((get("KEYLESS_CLIENT_ID")?, get("KEYLESS_CLIENT_SECRET")?))
}

struct Api {
    http: reqwest::Client,
    /// The server's URLs; every request fails over between them ([`keyless_node::upstream`]).
    servers: Endpoints,
    token: String,
    subscription: String,
    output: Output,
    query: Option<crate::query::Query>,
}

fn endpoints(data_dir: &std::path::Path) -> Value {
    std::fs::read(data_dir.join("endpoints.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// The CLI's HTTPS client: 60 s per request, and with several server URLs a connect timeout
/// of [`upstream::FAILOVER_CONNECT_TIMEOUT`] per attempt, so a dead replica is passed over
/// quickly.
fn http_client(ca_file: Option<&PathBuf>, several: bool) -> Result<reqwest::Client, CliError> {
    let mut b = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60));
    if several {
        b = b.connect_timeout(upstream::FAILOVER_CONNECT_TIMEOUT);
    }
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|source| CliError::Io {
            path: ca.display().to_string(),
            source,
        })?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| CliError::Usage(format!("{}: {e}", ca.display())))?;
        b = b.tls_certs_only([cert]);
    }
    b.build().map_err(|e| CliError::Usage(e.to_string()))
}

async fn remote_error(resp: reqwest::Response) -> CliError {
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    let (code, message) = if let Some(e) = v.get("error").filter(|e| e.is_object()) {
        (
            e["code"].as_str().unwrap_or("").to_string(),
            e["message"].as_str().unwrap_or("").to_string(),
        )
    } else {
        (
            v["error"].as_str().unwrap_or(status.as_str()).to_string(),
            v["error_description"].as_str().unwrap_or("").to_string(),
        )
    };
    CliError::Remote { code, message }
}

impl Api {
    async fn connect(c: &Conn) -> Result<Self, CliError> {
        let query = c
            .query
            .as_deref()
            .map(crate::query::Query::parse)
            .transpose()
            .map_err(CliError::Usage)?;
        let ep = endpoints(&c.data_dir);
        let urls = if c.server.is_empty() {
            ep["serverUrl"]
                .as_str()
                .map(|u| keyless_ops::failover::parse_urls([u]))
                .unwrap_or_default()
        } else {
            keyless_ops::failover::parse_urls(&c.server)
        };
        let servers = Endpoints::new(urls).ok_or_else(|| {
            CliError::Usage(
                "no server: set KEYLESS_SERVER or --server (or run `keyless up` here)".into(),
            )
        })?;
        let tenant = c
            .tenant
            .clone()
            .or_else(|| ep["tenantId"].as_str().map(str::to_string))
            .ok_or_else(|| {
                CliError::Usage("no tenant: set KEYLESS_TENANT_ID or --tenant".into())
            })?;
        let ca = c
            .ca_file
            .clone()
            .or_else(|| ep["caFile"].as_str().map(PathBuf::from));
        // the bootstrap admin's file in the data dir, when it is readable and only for the
        // server that data dir belongs to (never sent to another --server: every URL given
        // must be that server's, as a request may fail over to any of them)
        let own_server = ep["serverUrl"].as_str().is_some_and(|u| {
            let u = u.trim_end_matches('/');
            servers.urls().iter().all(|s| s == u)
        });
        let saved = own_server.then(|| bootstrap_admin(&c.data_dir)).flatten();
        let client_id = c
            .client_id_admin
            .clone()
            .or_else(|| ep["adminClientId"].as_str().map(str::to_string))
            .or_else(|| saved.as_ref().map(|(id, _)| id.clone()))
            .ok_or_else(|| CliError::Usage("no admin client id: set KEYLESS_CLIENT_ID".into()))?;
        let secret = c
            .client_secret
            .clone()
            .or_else(|| {
                saved
                    .filter(|(id, _)| id.eq_ignore_ascii_case(&client_id))
                    .map(|(_, s)| s)
            })
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "no admin secret: set KEYLESS_CLIENT_SECRET, or run where {} is readable",
                    c.data_dir.join(crate::run::BOOTSTRAP_SECRET_FILE).display()
                ))
            })?;
        let http = http_client(ca.as_ref(), servers.urls().len() > 1)?;
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", secret.as_str()),
            ("scope", "https://management.azure.com/.default"),
        ];
        let (url, resp) = upstream::send(&servers, &format!("/{tenant}/oauth2/v2.0/token"), |u| {
            http.post(u).form(&form)
        })
        .await;
        let resp = resp.map_err(|source| CliError::Http {
            url: url.clone(),
            source,
        })?;
        if !resp.status().is_success() {
            return Err(remote_error(resp).await);
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|source| CliError::Http { url, source })?;
        let token = v["access_token"].as_str().unwrap_or_default().to_string();
        let subscription = match c
            .subscription
            .clone()
            .or_else(|| ep["subscriptionId"].as_str().map(str::to_string))
        {
            Some(s) => s,
            None => {
                let mut api = Self {
                    http,
                    servers,
                    token,
                    subscription: String::new(),
                    output: c.output.unwrap_or_default(),
                    query,
                };
                let subs = api
                    .call(
                        reqwest::Method::GET,
                        &format!("/subscriptions?api-version={RESOURCES_API}"),
                        None,
                    )
                    .await?;
                api.subscription = subs["value"][0]["subscriptionId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                return Ok(api);
            }
        };
        Ok(Self {
            http,
            servers,
            token,
            subscription,
            output: c.output.unwrap_or_default(),
            query,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let (url, resp) = upstream::send(&self.servers, path, |url| {
            let req = self
                .http
                .request(method.clone(), url)
                .bearer_auth(&self.token);
            match &body {
                Some(b) => req.json(b),
                None => req,
            }
        })
        .await;
        let resp = resp.map_err(|source| CliError::Http {
            url: url.clone(),
            source,
        })?;
        if !resp.status().is_success() {
            return Err(remote_error(resp).await);
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| CliError::Http { url, source })?;
        Ok(if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        })
    }

    fn rg_path(&self, rg: &str) -> String {
        format!("/subscriptions/{}/resourceGroups/{rg}", self.subscription)
    }

    /// Path of a resource of type `ty` (`Namespace/type`), with its api-version.
    fn res_path(&self, rg: &str, ty: &str, name: &str, version: &str) -> String {
        self.sub_path(rg, ty, name, &[], version)
    }

    /// Path below a resource: `{resource}/{segments…}` (child collections, children, actions),
    /// with the api-version; `None` segments are left out.
    fn sub_path(
        &self,
        rg: &str,
        ty: &str,
        name: &str,
        segments: &[Option<&str>],
        version: &str,
    ) -> String {
        let mut path = format!("{}/providers/{ty}/{name}", self.rg_path(rg));
        for seg in segments.iter().flatten() {
            path.push('/');
            path.push_str(seg);
        }
        format!("{path}?api-version={version}")
    }

    /// GET an ARM list and every page after it (`nextLink`): the items, as one array. A next
    /// link is followed on the server it names' path (any of the servers answers it).
    async fn list_all(&self, path: &str) -> Result<Value, CliError> {
        let mut items = Vec::new();
        let mut next = Some(path.to_string());
        while let Some(p) = next.take() {
            let page = self.call(reqwest::Method::GET, &p, None).await?;
            items.extend(page["value"].as_array().cloned().unwrap_or_default());
            next = page["nextLink"]
                .as_str()
                .and_then(|l| reqwest::Url::parse(l).ok())
                .map(|u| match u.query() {
                    Some(q) => format!("{}?{q}", u.path()),
                    None => u.path().to_string(),
                });
        }
        Ok(Value::Array(items))
    }

    /// List resources of type `ty` in a group or the whole subscription.
    async fn list(&self, rg: Option<&str>, ty: &str, version: &str) -> Result<Value, CliError> {
        let scope = match rg {
            Some(rg) => self.rg_path(rg),
            None => format!("/subscriptions/{}", self.subscription),
        };
        let p = format!("{scope}/providers/{ty}?api-version={version}");
        self.list_all(&p).await
    }

    fn print(&self, v: &Value) {
        match &self.query {
            Some(q) => print_value(&q.apply(v), self.output),
            None => print_value(v, self.output),
        }
    }
}

/// Resolve `--identities` values: a full id stays; a bare name means a user-assigned identity
/// in the VM's group; `[system]` means the system-assigned identity.
fn identity_ids(api: &Api, rg: &str, names: &[String]) -> (bool, Vec<String>) {
    let mut system = false;
    let mut ids = vec![];
    for n in names {
        if n.eq_ignore_ascii_case("[system]") {
            system = true;
        } else if n.starts_with('/') {
            ids.push(n.clone());
        } else {
            ids.push(format!(
                "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{n}",
                api.rg_path(rg)
            ));
        }
    }
    (system, ids)
}

fn flatten_row(v: &Value) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut push = |k: &str, v: &Value| {
        if let Some(s) = v.as_str() {
            out.push((k.to_string(), s.to_string()));
        } else if v.is_number() || v.is_boolean() {
            out.push((k.to_string(), v.to_string()));
        }
    };
    if let Some(m) = v.as_object() {
        for (k, val) in m {
            if k == "properties" {
                if let Some(p) = val.as_object() {
                    for (pk, pv) in p {
                        push(pk, pv);
                    }
                }
            } else {
                push(k, val);
            }
        }
    }
    out
}

/// A scalar as tsv / table show it (strings unquoted, null empty).
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

fn print_value(v: &Value, output: Output) {
    // scalars (e.g. after --query) print bare, a list of scalars one per line, as az does
    if matches!(output, Output::Table | Output::Tsv) {
        if let Some(t) = scalar_text(v) {
            println!("{t}");
            return;
        }
        if let Some(items) = v.as_array().filter(|a| a.iter().all(|x| !x.is_object())) {
            for x in items {
                match scalar_text(x) {
                    Some(t) => println!("{t}"),
                    None => println!(
                        "{}",
                        x.as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(scalar_text)
                                .collect::<Vec<_>>()
                                .join("\t"))
                            .unwrap_or_default()
                    ),
                }
            }
            return;
        }
    }
    match output {
        Output::None => {}
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table | Output::Tsv => {
            let rows: Vec<&Value> = match v.get("value").and_then(Value::as_array) {
                Some(a) => a.iter().collect(),
                None => match v.as_array() {
                    Some(a) => a.iter().collect(),
                    None => vec![v],
                },
            };
            const PREFERRED: &[&str] = &[
                "name",
                "location",
                "type",
                "clientId",
                "principalId",
                "tenantId",
                "vmId",
                "provisioningState",
                "access_token",
                "expires_on",
                "resource",
            ];
            let flat: Vec<Vec<(String, String)>> = rows.iter().map(|r| flatten_row(r)).collect();
            let cols: Vec<&str> = PREFERRED
                .iter()
                .copied()
                .filter(|c| flat.iter().any(|r| r.iter().any(|(k, _)| k == c)))
                .collect();
            let cell = |r: &Vec<(String, String)>, c: &str| {
                r.iter()
                    .find(|(k, _)| k == c)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            if matches!(output, Output::Tsv) {
                for r in &flat {
                    println!(
                        "{}",
                        cols.iter()
                            .map(|c| cell(r, c))
                            .collect::<Vec<_>>()
                            .join("\t")
                    );
                }
                return;
            }
            let widths: Vec<usize> = cols
                .iter()
                .map(|c| {
                    flat.iter()
                        .map(|r| cell(r, c).len())
                        .max()
                        .unwrap_or(0)
                        .max(c.len())
                })
                .collect();
            let line = |vals: Vec<String>| {
                vals.iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            let title = |c: &str| {
                let mut s = c.to_string();
                if let Some(f) = s.get_mut(0..1) {
                    f.make_ascii_uppercase();
                }
                s
            };
            println!("{}", line(cols.iter().map(|c| title(c)).collect()));
            println!("{}", line(widths.iter().map(|w| "-".repeat(*w)).collect()));
            for r in &flat {
                println!("{}", line(cols.iter().map(|c| cell(r, c)).collect()));
            }
        }
    }
}

fn parse_tags(tags: &[String]) -> Result<Value, CliError> {
    let mut m = serde_json::Map::new();
    for t in tags {
        let (k, v) = t.split_once('=').unwrap_or((t.as_str(), ""));
        if k.is_empty() {
            return Err(CliError::Usage(format!("invalid tag '{t}': use key=value")));
        }
        m.insert(k.to_string(), json!(v));
    }
    Ok(Value::Object(m))
}

// ------------------------------------------------------------------ identity

#[derive(Args)]
pub struct IdentityCmd {
    #[command(subcommand)]
    cmd: IdentityVerb,
    #[command(flatten)]
    conn: Conn,
}

// The user-assigned identity whose federated identity credentials (or credential patterns) a
// verb is about. (Plain comments: clap would show a doc comment as the verbs' help.)
#[derive(Args)]
struct FicOwner {
    #[arg(short = 'g', long)]
    resource_group: String,
    #[arg(long)]
    identity_name: String,
}

impl FicOwner {
    /// The path of its `child`ren (credentials or credential patterns), or of one.
    fn path(&self, api: &Api, child: &str, name: Option<&str>) -> String {
        let (rg, identity) = (&self.resource_group, &self.identity_name);
        api.sub_path(rg, IDENTITY_TY, identity, &[Some(child), name], MSI_API)
    }
}

// One federated identity credential (or credential pattern).
#[derive(Args)]
struct FicName {
    #[command(flatten)]
    owner: FicOwner,
    #[arg(short = 'n', long)]
    name: String,
}

impl FicName {
    fn path(&self, api: &Api, child: &str) -> String {
        self.owner.path(api, child, Some(&self.name))
    }
}

#[derive(Subcommand)]
enum FicVerb {
    Create {
        #[command(flatten)]
        at: FicName,
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        subject: String,
        /// As az: space-separated, default api://AzureADTokenExchange (`--audience` also taken).
        #[arg(long, alias = "audience", num_args = 1.., default_values_t = vec!["api://AzureADTokenExchange".to_string()])]
        audiences: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    #[command(flatten)]
    Other(FicOtherVerb),
}

/// The verbs of `identity federated-credential-pattern` (a Keyless extension).
#[derive(Subcommand)]
enum FicPatternVerb {
    Create {
        #[command(flatten)]
        at: FicName,
        #[arg(long)]
        issuer: String,
        /// `*` stands for one or more characters other than `:`
        /// (`system:serviceaccount:team-a:*`).
        #[arg(long)]
        subject_pattern: String,
        #[arg(long, alias = "audience", num_args = 1.., default_values_t = vec!["api://AzureADTokenExchange".to_string()])]
        audiences: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    #[command(flatten)]
    Other(FicOtherVerb),
}

/// The verbs but `create`, alike for credentials and credential patterns.
#[derive(Subcommand)]
enum FicOtherVerb {
    Show(FicName),
    List(FicOwner),
    Delete(FicName),
}

/// The children of a user-assigned identity that `identity federated-credential` manages.
const FICS: &str = "federatedIdentityCredentials";
/// Those `identity federated-credential-pattern` manages.
const FIC_PATTERNS: &str = "federatedIdentityCredentialPatterns";

/// `create`: PUT the credential (or pattern) `at` names with these `properties`.
async fn fic_create(
    api: &Api,
    child: &str,
    at: &FicName,
    properties: Value,
) -> Result<Value, CliError> {
    let body = json!({ "properties": properties });
    api.call(reqwest::Method::PUT, &at.path(api, child), Some(body))
        .await
}

/// `show`, `list`, `delete` of `child`ren, printed as the other verbs print.
async fn fic_other(api: &Api, child: &str, verb: FicOtherVerb) -> Result<(), CliError> {
    let v = match verb {
        FicOtherVerb::Show(at) => {
            api.call(reqwest::Method::GET, &at.path(api, child), None)
                .await?
        }
        FicOtherVerb::List(owner) => {
            let path = owner.path(api, child, None);
            api.list_all(&path).await?
        }
        FicOtherVerb::Delete(at) => {
            api.call(reqwest::Method::DELETE, &at.path(api, child), None)
                .await?;
            return Ok(());
        }
    };
    api.print(&v);
    Ok(())
}

#[derive(Subcommand)]
enum IdentityVerb {
    /// Federated identity credentials of a user-assigned identity.
    FederatedCredential {
        #[command(subcommand)]
        verb: FicVerb,
    },
    /// Federated identity credential patterns of a user-assigned identity (Keyless): subjects
    /// matched by a pattern, beyond the 20 credentials' cap.
    FederatedCredentialPattern {
        #[command(subcommand)]
        verb: FicPatternVerb,
    },
    /// Create (or update) a user-assigned identity.
    Create {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'l', long, default_value = "local")]
        location: String,
        #[arg(long, num_args = 0..)]
        tags: Vec<String>,
    },
    Show {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
    },
    List {
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
    },
    Delete {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
    },
}

/// The type of user-assigned identities.
const IDENTITY_TY: &str = "Microsoft.ManagedIdentity/userAssignedIdentities";

pub async fn identity(c: IdentityCmd) -> Result<(), CliError> {
    let api = Api::connect(&c.conn).await?;
    let path = |rg: &str, n: &str| api.res_path(rg, IDENTITY_TY, n, MSI_API);
    let v = match c.cmd {
        IdentityVerb::FederatedCredential {
            verb:
                FicVerb::Create {
                    at,
                    issuer,
                    subject,
                    audiences,
                    description,
                },
        } => {
            let props = json!({"issuer": issuer, "subject": subject, "audiences": audiences, "description": description});
            fic_create(&api, FICS, &at, props).await?
        }
        IdentityVerb::FederatedCredentialPattern {
            verb:
                FicPatternVerb::Create {
                    at,
                    issuer,
                    subject_pattern,
                    audiences,
                    description,
                },
        } => {
            let props = json!({"issuer": issuer, "subjectPattern": subject_pattern, "audiences": audiences, "description": description});
            fic_create(&api, FIC_PATTERNS, &at, props).await?
        }
        IdentityVerb::FederatedCredential {
            verb: FicVerb::Other(verb),
        } => return fic_other(&api, FICS, verb).await,
        IdentityVerb::FederatedCredentialPattern {
            verb: FicPatternVerb::Other(verb),
        } => return fic_other(&api, FIC_PATTERNS, verb).await,
        IdentityVerb::Create {
            resource_group,
            name,
            location,
            tags,
        } => {
            let body = json!({"location": location, "tags": parse_tags(&tags)?});
            api.call(
                reqwest::Method::PUT,
                &path(&resource_group, &name),
                Some(body),
            )
            .await?
        }
        IdentityVerb::Show {
            resource_group,
            name,
        } => {
            api.call(reqwest::Method::GET, &path(&resource_group, &name), None)
                .await?
        }
        IdentityVerb::List { resource_group } => {
            api.list(resource_group.as_deref(), IDENTITY_TY, MSI_API)
                .await?
        }
        IdentityVerb::Delete {
            resource_group,
            name,
        } => {
            api.call(reqwest::Method::DELETE, &path(&resource_group, &name), None)
                .await?;
            return Ok(());
        }
    };
    api.print(&v);
    Ok(())
}

// ------------------------------------------------------------------ vm

#[derive(Args)]
pub struct VmCmd {
    #[command(subcommand)]
    cmd: VmVerb,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
enum VmVerb {
    /// Create a VM (a host record); `--assign-identity` takes `[system]` and identity names/ids.
    Create {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'l', long, default_value = "local")]
        location: String,
        #[arg(long, num_args = 0..)]
        assign_identity: Option<Vec<String>>,
        #[arg(long, num_args = 0..)]
        tags: Vec<String>,
    },
    Show {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
    },
    List {
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
    },
    Delete {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
    },
    /// List a scale set's instances (hosts that joined it).
    ListInstances {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
    },
    /// Issue a one-time join token for `keyless node --join-token`.
    JoinToken {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
    },
    /// Assign or remove identities.
    Identity {
        #[command(subcommand)]
        verb: VmIdentityVerb,
    },
    /// VM extensions (e.g. KeyVaultForLinux), run by the VM's host agent.
    Extension {
        #[command(subcommand)]
        verb: VmExtensionVerb,
    },
}

#[derive(Subcommand)]
enum VmExtensionVerb {
    /// Add or update an extension (`az vm extension set`).
    Set {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        vm_name: String,
        /// Extension name (also its type unless --extension-type is given).
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long)]
        publisher: String,
        #[arg(long)]
        extension_type: Option<String>,
        #[arg(long, default_value = "3.0")]
        version: String,
        /// Settings JSON, or @FILE.
        #[arg(long)]
        settings: Option<String>,
    },
    Show {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        vm_name: String,
        #[arg(short = 'n', long)]
        name: String,
    },
    List {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        vm_name: String,
    },
    Delete {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        vm_name: String,
        #[arg(short = 'n', long)]
        name: String,
    },
}

/// A JSON argument given inline or as `@FILE`.
fn json_arg(v: &str) -> Result<Value, CliError> {
    let text = match v.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|source| CliError::Io {
            path: path.to_string(),
            source,
        })?,
        None => v.to_string(),
    };
    serde_json::from_str(&text).map_err(|e| CliError::Usage(format!("invalid JSON: {e}")))
}

#[derive(Subcommand)]
enum VmIdentityVerb {
    Assign {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        /// `[system]` and/or user-assigned identity names or ids (default: [system]).
        #[arg(long, num_args = 0..)]
        identities: Vec<String>,
    },
    Remove {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long, num_args = 0..)]
        identities: Vec<String>,
    },
}

fn identity_type(system: bool, user: bool) -> &'static str {
    match (system, user) {
        (true, true) => "SystemAssigned, UserAssigned",
        (true, false) => "SystemAssigned",
        (false, true) => "UserAssigned",
        (false, false) => "None",
    }
}

pub const VM_TYPE: &str = "Microsoft.Compute/virtualMachines";
pub const VMSS_TYPE: &str = "Microsoft.Compute/virtualMachineScaleSets";

/// `keyless vm ...` and `keyless vmss ...` (same verbs; `ty` is the resource type).
pub async fn vm(c: VmCmd, ty: &'static str) -> Result<(), CliError> {
    let api = Api::connect(&c.conn).await?;
    let path = |rg: &str, n: &str| api.res_path(rg, ty, n, COMPUTE_API);
    let v = match c.cmd {
        VmVerb::Create {
            resource_group,
            name,
            location,
            assign_identity,
            tags,
        } => {
            let mut body =
                json!({"location": location, "tags": parse_tags(&tags)?, "properties": {}});
            if let Some(ids) = assign_identity {
                let ids = if ids.is_empty() {
                    vec!["[system]".to_string()]
                } else {
                    ids
                };
                let (system, user) = identity_ids(&api, &resource_group, &ids);
                let mut ident = json!({"type": identity_type(system, !user.is_empty())});
                if !user.is_empty() {
                    ident["userAssignedIdentities"] = user
                        .iter()
                        .map(|u| (u.clone(), json!({})))
                        .collect::<serde_json::Map<_, _>>()
                        .into();
                }
                body["identity"] = ident;
            }
            api.call(
                reqwest::Method::PUT,
                &path(&resource_group, &name),
                Some(body),
            )
            .await?
        }
        VmVerb::Show {
            resource_group,
            name,
        } => {
            api.call(reqwest::Method::GET, &path(&resource_group, &name), None)
                .await?
        }
        VmVerb::List { resource_group } => {
            api.list(resource_group.as_deref(), ty, COMPUTE_API).await?
        }
        VmVerb::Delete {
            resource_group,
            name,
        } => {
            api.call(reqwest::Method::DELETE, &path(&resource_group, &name), None)
                .await?;
            return Ok(());
        }
        VmVerb::ListInstances {
            resource_group,
            name,
        } => {
            if ty != VMSS_TYPE {
                return Err(CliError::Usage(
                    "list-instances applies to scale sets (keyless vmss)".into(),
                ));
            }
            let p = format!(
                "{}/providers/{ty}/{name}/virtualMachines?api-version={COMPUTE_API}",
                api.rg_path(&resource_group)
            );
            api.list_all(&p).await?
        }
        VmVerb::JoinToken {
            resource_group,
            name,
            expires_in,
        } => {
            let p = format!(
                "{}/providers/{ty}/{name}/generateJoinToken?api-version={COMPUTE_API}",
                api.rg_path(&resource_group)
            );
            api.call(
                reqwest::Method::POST,
                &p,
                Some(json!({"expiresInSeconds": expires_in})),
            )
            .await?
        }
        VmVerb::Extension { verb } => {
            let ext = |rg: &str, vm: &str, n: Option<&str>| {
                api.sub_path(rg, ty, vm, &[Some("extensions"), n], COMPUTE_API)
            };
            match verb {
                VmExtensionVerb::Set {
                    resource_group,
                    vm_name,
                    name,
                    publisher,
                    extension_type,
                    version,
                    settings,
                } => {
                    let settings = match settings {
                        Some(s) => json_arg(&s)?,
                        None => json!({}),
                    };
                    let body = json!({"properties": {
                        "publisher": publisher,
                        "type": extension_type.unwrap_or_else(|| name.clone()),
                        "typeHandlerVersion": version,
                        "autoUpgradeMinorVersion": true,
                        "settings": settings,
                    }});
                    api.call(
                        reqwest::Method::PUT,
                        &ext(&resource_group, &vm_name, Some(&name)),
                        Some(body),
                    )
                    .await?
                }
                VmExtensionVerb::Show {
                    resource_group,
                    vm_name,
                    name,
                } => {
                    api.call(
                        reqwest::Method::GET,
                        &ext(&resource_group, &vm_name, Some(&name)),
                        None,
                    )
                    .await?
                }
                VmExtensionVerb::List {
                    resource_group,
                    vm_name,
                } => api.list_all(&ext(&resource_group, &vm_name, None)).await?,
                VmExtensionVerb::Delete {
                    resource_group,
                    vm_name,
                    name,
                } => {
                    api.call(
                        reqwest::Method::DELETE,
                        &ext(&resource_group, &vm_name, Some(&name)),
                        None,
                    )
                    .await?;
                    return Ok(());
                }
            }
        }
        VmVerb::Identity { verb } => {
            let (rg, name, ids, assign) = match verb {
                VmIdentityVerb::Assign {
                    resource_group,
                    name,
                    identities,
                } => (resource_group, name, identities, true),
                VmIdentityVerb::Remove {
                    resource_group,
                    name,
                    identities,
                } => (resource_group, name, identities, false),
            };
            let ids = if ids.is_empty() {
                vec!["[system]".to_string()]
            } else {
                ids
            };
            let cur = api
                .call(reqwest::Method::GET, &path(&rg, &name), None)
                .await?;
            let cur_type = cur["identity"]["type"]
                .as_str()
                .unwrap_or("None")
                .to_ascii_lowercase();
            let cur_users: Vec<String> = cur["identity"]["userAssignedIdentities"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let (sys, user) = identity_ids(&api, &rg, &ids);
            let had_sys = cur_type.contains("systemassigned");
            let same = |a: &String, b: &String| a.eq_ignore_ascii_case(b);
            let (new_sys, new_users): (bool, Vec<String>) = if assign {
                let mut u = cur_users.clone();
                for x in &user {
                    if !u.iter().any(|y| same(x, y)) {
                        u.push(x.clone());
                    }
                }
                (had_sys || sys, u)
            } else {
                (
                    had_sys && !sys,
                    cur_users
                        .iter()
                        .filter(|y| !user.iter().any(|x| same(x, y)))
                        .cloned()
                        .collect(),
                )
            };
            let mut ident = json!({"type": identity_type(new_sys, !new_users.is_empty())});
            if !new_users.is_empty() || !cur_users.is_empty() {
                let mut m = serde_json::Map::new();
                for u in &cur_users {
                    if !new_users.iter().any(|x| same(x, u)) {
                        m.insert(u.clone(), Value::Null);
                    }
                }
                for u in &new_users {
                    m.insert(u.clone(), json!({}));
                }
                if !new_users.is_empty() {
                    ident["userAssignedIdentities"] = Value::Object(m);
                }
            }
            let vm = api
                .call(
                    reqwest::Method::PATCH,
                    &path(&rg, &name),
                    Some(json!({"identity": ident})),
                )
                .await?;
            vm["identity"].clone()
        }
    };
    api.print(&v);
    Ok(())
}

// ------------------------------------------------------------------ group

#[derive(Args)]
pub struct GroupCmd {
    #[command(subcommand)]
    cmd: GroupVerb,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
enum GroupVerb {
    Create {
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'l', long, default_value = "local")]
        location: String,
        #[arg(long, num_args = 0..)]
        tags: Vec<String>,
    },
    Show {
        #[arg(short = 'n', long)]
        name: String,
    },
    List,
    Delete {
        #[arg(short = 'n', long)]
        name: String,
    },
}

pub async fn group(c: GroupCmd) -> Result<(), CliError> {
    let api = Api::connect(&c.conn).await?;
    let path = |n: &str| format!("{}?api-version={RESOURCES_API}", api.rg_path(n));
    let v = match c.cmd {
        GroupVerb::Create {
            name,
            location,
            tags,
        } => {
            api.call(
                reqwest::Method::PUT,
                &path(&name),
                Some(json!({"location": location, "tags": parse_tags(&tags)?})),
            )
            .await?
        }
        GroupVerb::Show { name } => api.call(reqwest::Method::GET, &path(&name), None).await?,
        GroupVerb::List => {
            let p = format!(
                "/subscriptions/{}/resourcegroups?api-version={RESOURCES_API}",
                api.subscription
            );
            api.list_all(&p).await?
        }
        GroupVerb::Delete { name } => {
            api.call(reqwest::Method::DELETE, &path(&name), None)
                .await?;
            return Ok(());
        }
    };
    api.print(&v);
    Ok(())
}

// ------------------------------------------------------------------ get-token

#[derive(Args)]
pub struct GetTokenArgs {
    /// The resource (audience), e.g. https://management.azure.com/.
    #[arg(long)]
    resource: String,
    #[arg(long)]
    client_id: Option<String>,
    #[arg(long)]
    object_id: Option<String>,
    #[arg(long)]
    msi_res_id: Option<String>,
    /// IMDS base URL (default: AZURE_POD_IDENTITY_AUTHORITY_HOST, then endpoints.json, then
    /// http://169.254.169.254).
    #[arg(long, env = "AZURE_POD_IDENTITY_AUTHORITY_HOST")]
    imds_endpoint: Option<String>,
    #[arg(long, env = "KEYLESS_DATA_DIR", default_value = ".keyless")]
    data_dir: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Json)]
    output: Output,
}

pub async fn get_token(a: GetTokenArgs) -> Result<(), CliError> {
    let base = a
        .imds_endpoint
        .clone()
        .or_else(|| {
            endpoints(&a.data_dir)["imdsUrl"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "http://169.254.169.254".to_string());
    let mut q = vec![
        ("api-version", "2018-02-01".to_string()),
        ("resource", a.resource.clone()),
    ];
    for (k, v) in [
        ("client_id", &a.client_id),
        ("object_id", &a.object_id),
        ("msi_res_id", &a.msi_res_id),
    ] {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    let url = format!(
        "{}/metadata/identity/oauth2/token?{}",
        base.trim_end_matches('/'),
        serde_urlencoded::to_string(&q).unwrap_or_default()
    );
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| CliError::Usage(e.to_string()))?
        .get(&url)
        .header("Metadata", "true")
        .send()
        .await
        .map_err(|source| CliError::Http {
            url: url.clone(),
            source,
        })?;
    if !resp.status().is_success() {
        return Err(remote_error(resp).await);
    }
    let v: Value = resp
        .json()
        .await
        .map_err(|source| CliError::Http { url, source })?;
    print_value(&v, a.output);
    Ok(())
}

// ------------------------------------------------------------------ role

const AUTHZ_API: &str = "2022-04-01";

#[derive(Args)]
pub struct RoleCmd {
    #[command(subcommand)]
    cmd: RoleVerb,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
enum RoleVerb {
    /// Role assignments.
    Assignment {
        #[command(subcommand)]
        verb: AssignmentVerb,
    },
    /// Role definitions (built-in roles).
    Definition {
        #[command(subcommand)]
        verb: DefinitionVerb,
    },
}

#[derive(Subcommand)]
enum DefinitionVerb {
    List {
        /// A role name, e.g. "Managed Identity Operator".
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum AssignmentVerb {
    /// Assign a role to a principal (object id, or client id of a service principal or managed identity).
    Create {
        #[arg(long)]
        assignee: Option<String>,
        /// Skip the directory lookup: the object id of the principal.
        #[arg(long)]
        assignee_object_id: Option<String>,
        /// Role name or id.
        #[arg(long)]
        role: String,
        /// Scope: subscription, group or resource id (default: -g's group, else the subscription).
        #[arg(long)]
        scope: Option<String>,
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    List {
        #[arg(long)]
        assignee: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        scope: Option<String>,
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
        /// Show assignments at and above the scope and below it (default: at and above).
        #[arg(long)]
        all: bool,
    },
    Delete {
        /// Role assignment ids.
        #[arg(long, num_args = 1..)]
        ids: Vec<String>,
        #[arg(long)]
        assignee: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        scope: Option<String>,
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
    },
}

impl Api {
    fn scope(&self, scope: Option<String>, rg: Option<String>) -> Result<String, CliError> {
        let s = match (scope, rg) {
            (Some(s), _) => s.trim_end_matches('/').to_string(),
            (None, Some(rg)) => self.rg_path(&rg),
            (None, None) => format!("/subscriptions/{}", self.subscription),
        };
        if keyless_core::resource_id::Scope::parse(&s).is_err() {
            return Err(CliError::Usage(format!("invalid scope '{s}': use /subscriptions/<id>[/resourceGroups/<name>[/providers/...]]")));
        }
        Ok(s)
    }

    /// A role's full definition id from its name or id.
    async fn role_id(&self, role: &str) -> Result<String, CliError> {
        let base = format!(
            "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions",
            self.subscription
        );
        let filter = if uuid::Uuid::parse_str(role).is_ok() {
            None
        } else {
            Some(format!("roleName eq '{role}'"))
        };
        let path = match &filter {
            Some(f) => format!(
                "{base}?api-version={AUTHZ_API}&{}",
                serde_urlencoded::to_string([("$filter", f)]).unwrap_or_default()
            ),
            None => format!("{base}/{role}?api-version={AUTHZ_API}"),
        };
        let v = match self.call(reqwest::Method::GET, &path, None).await {
            Ok(v) => v,
            Err(CliError::Remote { code, .. }) if code == "RoleDefinitionDoesNotExist" => {
                Value::Null
            }
            Err(e) => return Err(e),
        };
        let id = if filter.is_some() {
            v["value"][0]["id"].as_str()
        } else {
            v["id"].as_str()
        };
        id.map(str::to_string)
            .ok_or_else(|| CliError::Usage(format!("Role '{role}' doesn't exist.")))
    }

    /// An assignee's object id, from an object id or a client (app) id.
    async fn principal(&self, assignee: &str) -> Result<String, CliError> {
        let f = serde_urlencoded::to_string([("$filter", format!("appId eq '{assignee}'"))])
            .unwrap_or_default();
        let by_app = self
            .call(
                reqwest::Method::GET,
                &format!("/v1.0/servicePrincipals?{f}"),
                None,
            )
            .await?;
        if let Some(id) = by_app["value"][0]["id"].as_str() {
            return Ok(id.to_string());
        }
        match self
            .call(
                reqwest::Method::GET,
                &format!("/v1.0/servicePrincipals/{assignee}"),
                None,
            )
            .await
        {
            Ok(v) => Ok(v["id"].as_str().unwrap_or(assignee).to_string()),
            Err(_) => Err(CliError::Usage(format!(
                "Cannot find user or service principal in graph database for '{assignee}'."
            ))),
        }
    }

    async fn list_assignments(
        &self,
        scope: &str,
        assignee: Option<&str>,
        all: bool,
    ) -> Result<Vec<Value>, CliError> {
        let mut f = vec![];
        if !all {
            f.push("atScope()".to_string());
        }
        if let Some(a) = assignee {
            f.push(format!("principalId eq '{}'", self.principal(a).await?));
        }
        let mut path = format!(
            "{scope}/providers/Microsoft.Authorization/roleAssignments?api-version={AUTHZ_API}"
        );
        if !f.is_empty() {
            path.push('&');
            path.push_str(
                &serde_urlencoded::to_string([("$filter", f.join(" and "))]).unwrap_or_default(),
            );
        }
        Ok(self
            .list_all(&path)
            .await?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

fn same_role(a: &Value, role_id: &str) -> bool {
    let guid = |s: &str| {
        s.rsplit('/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    guid(
        a["properties"]["roleDefinitionId"]
            .as_str()
            .unwrap_or_default(),
    ) == guid(role_id)
}

pub async fn role(c: RoleCmd) -> Result<(), CliError> {
    let api = Api::connect(&c.conn).await?;
    let v = match c.cmd {
        RoleVerb::Definition {
            verb: DefinitionVerb::List { name },
        } => {
            let mut path = format!("/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions?api-version={AUTHZ_API}", api.subscription);
            if let Some(n) = name {
                path.push('&');
                path.push_str(
                    &serde_urlencoded::to_string([("$filter", format!("roleName eq '{n}'"))])
                        .unwrap_or_default(),
                );
            }
            api.list_all(&path).await?
        }
        RoleVerb::Assignment {
            verb:
                AssignmentVerb::Create {
                    assignee,
                    assignee_object_id,
                    role,
                    scope,
                    resource_group,
                    description,
                },
        } => {
            let scope = api.scope(scope, resource_group)?;
            let role_id = api.role_id(&role).await?;
            let principal = match (assignee_object_id, assignee) {
                (Some(o), _) => o,
                (None, Some(a)) => api.principal(&a).await?,
                (None, None) => {
                    return Err(CliError::Usage(
                        "--assignee or --assignee-object-id is required".into(),
                    ))
                }
            };
            let name = uuid::Uuid::new_v4();
            let path = format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}?api-version={AUTHZ_API}");
            let body = json!({"properties": {"roleDefinitionId": role_id, "principalId": principal, "principalType": "ServicePrincipal", "description": description}});
            api.call(reqwest::Method::PUT, &path, Some(body)).await?
        }
        RoleVerb::Assignment {
            verb:
                AssignmentVerb::List {
                    assignee,
                    role,
                    scope,
                    resource_group,
                    all,
                },
        } => {
            let scope = api.scope(scope, resource_group)?;
            let mut list = api
                .list_assignments(&scope, assignee.as_deref(), all)
                .await?;
            if let Some(r) = role {
                let id = api.role_id(&r).await?;
                list.retain(|a| same_role(a, &id));
            }
            Value::Array(list)
        }
        RoleVerb::Assignment {
            verb:
                AssignmentVerb::Delete {
                    ids,
                    assignee,
                    role,
                    scope,
                    resource_group,
                },
        } => {
            let targets: Vec<String> = if !ids.is_empty() {
                ids
            } else {
                let scope = api.scope(scope, resource_group)?;
                let mut list = api
                    .list_assignments(&scope, assignee.as_deref(), false)
                    .await?;
                list.retain(|a| {
                    a["properties"]["scope"]
                        .as_str()
                        .is_some_and(|s| s.eq_ignore_ascii_case(&scope))
                });
                if let Some(r) = role {
                    let id = api.role_id(&r).await?;
                    list.retain(|a| same_role(a, &id));
                }
                list.iter()
                    .filter_map(|a| a["id"].as_str().map(str::to_string))
                    .collect()
            };
            if targets.is_empty() {
                return Err(CliError::Usage(
                    "No matched assignments were found to delete".into(),
                ));
            }
            for id in &targets {
                api.call(
                    reqwest::Method::DELETE,
                    &format!("{id}?api-version={AUTHZ_API}"),
                    None,
                )
                .await?;
            }
            return Ok(());
        }
    };
    api.print(&v);
    Ok(())
}

// ------------------------------------------------------------------ app

#[derive(Args)]
pub struct AppCmd {
    #[command(subcommand)]
    cmd: AppVerb,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
enum AppVerb {
    /// Register an application (service principal); prints its client secret once.
    Create {
        #[arg(long)]
        display_name: String,
        /// PEM file with a certificate to register for client assertions (repeatable).
        #[arg(long = "cert-file")]
        cert_files: Vec<PathBuf>,
    },
}

pub async fn app(c: AppCmd) -> Result<(), CliError> {
    let api = Api::connect(&c.conn).await?;
    let AppVerb::Create {
        display_name,
        cert_files,
    } = c.cmd;
    let mut keys = vec![];
    for f in &cert_files {
        let pem = std::fs::read_to_string(f).map_err(|source| CliError::Io {
            path: f.display().to_string(),
            source,
        })?;
        keys.push(json!({"type": "AsymmetricX509Cert", "usage": "Verify", "key": pem}));
    }
    let body = json!({"displayName": display_name, "keyCredentials": keys});
    let v = api
        .call(reqwest::Method::POST, "/v1.0/applications", Some(body))
        .await?;
    let tenant = c.conn.tenant.clone().or_else(|| {
        endpoints(&c.conn.data_dir)["tenantId"]
            .as_str()
            .map(str::to_string)
    });
    // the shape `az ad sp create-for-rbac` prints
    api.print(&json!({
        "appId": v["appId"],
        "displayName": v["displayName"],
        "password": v["passwordCredentials"][0]["secretText"],
        "tenant": tenant,
        "objectId": v["id"],
    }));
    Ok(())
}

// ------------------------------------------------------------------ keyvault

const KEYVAULT_API: &str = "2023-07-01";
const VAULT_TYPE: &str = "Microsoft.KeyVault/vaults";

#[derive(Args)]
pub struct KeyVaultCmd {
    #[command(subcommand)]
    cmd: KeyVaultVerb,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
enum KeyVaultVerb {
    /// Create (or update) a vault. Its data plane is https://{name}.vault.{domain}[:port].
    Create {
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'l', long, default_value = "local")]
        location: String,
        /// Authorize data-plane calls with Azure RBAC data roles instead of access policies.
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        enable_rbac_authorization: Option<bool>,
        /// Soft-delete retention (7-90 days).
        #[arg(long)]
        retention_days: Option<u32>,
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        enable_purge_protection: Option<bool>,
        /// Soft delete (on by default; cannot be turned off once on).
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        enable_soft_delete: Option<bool>,
        #[arg(long, num_args = 0..)]
        tags: Vec<String>,
    },
    /// Show a vault.
    Show {
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
    },
    /// List vaults.
    List {
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
    },
    /// Delete a vault and everything in it.
    Delete {
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
    },
    /// Grant permissions to a principal (access-policy model).
    SetPolicy {
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
        /// Object (principal) id of the user, application or managed identity.
        #[arg(long)]
        object_id: String,
        #[arg(long, num_args = 1..)]
        secret_permissions: Vec<String>,
        #[arg(long, num_args = 1..)]
        key_permissions: Vec<String>,
        #[arg(long, num_args = 1..)]
        certificate_permissions: Vec<String>,
    },
    /// Remove a principal's access policy.
    DeletePolicy {
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
        #[arg(long)]
        object_id: String,
    },
    /// Move the Key Vault clock forward (server started with --dev-clock) and run the
    /// certificate lifetime actions that fall due.
    AdvanceClock {
        #[arg(long, default_value_t = 0)]
        days: u64,
        #[arg(long, default_value_t = 0)]
        seconds: u64,
    },
}

/// The group of vault `name`, given or found by listing the subscription.
async fn vault_group(api: &Api, name: &str, rg: Option<String>) -> Result<String, CliError> {
    if let Some(rg) = rg {
        return Ok(rg);
    }
    let all = api.list(None, VAULT_TYPE, KEYVAULT_API).await?;
    all.as_array()
        .into_iter()
        .flatten()
        .find(|v| {
            v["name"]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .and_then(|v| v["id"].as_str())
        .and_then(|id| id.split('/').nth(4))
        .map(str::to_string)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "The vault '{name}' was not found in the subscription."
            ))
        })
}

pub async fn keyvault(c: KeyVaultCmd) -> Result<(), CliError> {
    let api = Api::connect(&c.conn).await?;
    let path = |rg: &str, n: &str| api.res_path(rg, VAULT_TYPE, n, KEYVAULT_API);
    let policy_path = |rg: &str, n: &str, kind: &str| {
        api.sub_path(
            rg,
            VAULT_TYPE,
            n,
            &[Some("accessPolicies"), Some(kind)],
            KEYVAULT_API,
        )
    };
    let v = match c.cmd {
        KeyVaultVerb::Create {
            name,
            resource_group,
            location,
            enable_rbac_authorization,
            retention_days,
            enable_purge_protection,
            enable_soft_delete,
            tags,
        } => {
            let tenant = api
                .call(
                    reqwest::Method::GET,
                    &format!(
                        "/subscriptions/{}?api-version={RESOURCES_API}",
                        api.subscription
                    ),
                    None,
                )
                .await?["tenantId"]
                .clone();
            let mut props = json!({"tenantId": tenant, "sku": {"family": "A", "name": "standard"}});
            if let Some(r) = enable_rbac_authorization {
                props["enableRbacAuthorization"] = json!(r);
            }
            if let Some(d) = retention_days {
                props["softDeleteRetentionInDays"] = json!(d);
            }
            if let Some(p) = enable_purge_protection {
                props["enablePurgeProtection"] = json!(p);
            }
            if let Some(sd) = enable_soft_delete {
                props["enableSoftDelete"] = json!(sd);
            }
            let body =
                json!({"location": location, "tags": parse_tags(&tags)?, "properties": props});
            api.call(
                reqwest::Method::PUT,
                &path(&resource_group, &name),
                Some(body),
            )
            .await?
        }
        KeyVaultVerb::Show {
            name,
            resource_group,
        } => {
            let rg = vault_group(&api, &name, resource_group).await?;
            api.call(reqwest::Method::GET, &path(&rg, &name), None)
                .await?
        }
        KeyVaultVerb::List { resource_group } => {
            api.list(resource_group.as_deref(), VAULT_TYPE, KEYVAULT_API)
                .await?
        }
        KeyVaultVerb::Delete {
            name,
            resource_group,
        } => {
            let rg = vault_group(&api, &name, resource_group).await?;
            api.call(reqwest::Method::DELETE, &path(&rg, &name), None)
                .await?;
            return Ok(());
        }
        KeyVaultVerb::SetPolicy {
            name,
            resource_group,
            object_id,
            secret_permissions,
            key_permissions,
            certificate_permissions,
        } => {
            let rg = vault_group(&api, &name, resource_group).await?;
            let vault = api
                .call(reqwest::Method::GET, &path(&rg, &name), None)
                .await?;
            let body = json!({"properties": {"accessPolicies": [{
                "tenantId": vault["properties"]["tenantId"],
                "objectId": object_id,
                "permissions": {"secrets": secret_permissions, "keys": key_permissions, "certificates": certificate_permissions},
            }]}});
            api.call(
                reqwest::Method::PUT,
                &policy_path(&rg, &name, "add"),
                Some(body),
            )
            .await?
        }
        KeyVaultVerb::DeletePolicy {
            name,
            resource_group,
            object_id,
        } => {
            let rg = vault_group(&api, &name, resource_group).await?;
            let vault = api
                .call(reqwest::Method::GET, &path(&rg, &name), None)
                .await?;
            let body = json!({"properties": {"accessPolicies": [{
                "tenantId": vault["properties"]["tenantId"],
                "objectId": object_id,
                "permissions": {},
            }]}});
            api.call(
                reqwest::Method::PUT,
                &policy_path(&rg, &name, "remove"),
                Some(body),
            )
            .await?
        }
        KeyVaultVerb::AdvanceClock { days, seconds } => {
            api.call(
                reqwest::Method::POST,
                "/keyless/admin/v1/vault-clock",
                Some(json!({"advanceSeconds": days * 86_400 + seconds})),
            )
            .await?
        }
    };
    api.print(&v);
    Ok(())
}

// ------------------------------------------------------------------ batch

const BATCH_API: &str = "2024-07-01";
const BATCH_ACCOUNT_TYPE: &str = "Microsoft.Batch/batchAccounts";

#[derive(Args)]
pub struct BatchCmd {
    #[command(subcommand)]
    cmd: BatchVerb,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
enum BatchVerb {
    /// Batch accounts.
    Account {
        #[command(subcommand)]
        verb: BatchAccountVerb,
    },
    /// Pools: groups of hosts that share identities and extensions.
    Pool {
        #[command(subcommand)]
        verb: BatchPoolVerb,
    },
}

#[derive(Subcommand)]
enum BatchAccountVerb {
    Create {
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'l', long, default_value = "local")]
        location: String,
    },
    Show {
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
    },
    List {
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
    },
    Delete {
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
    },
}

#[derive(Subcommand)]
enum BatchPoolVerb {
    /// Create or replace a pool from a Batch management request body (JSON file, or `-`).
    Create {
        #[arg(long)]
        account_name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long)]
        body: String,
    },
    Show {
        #[arg(long)]
        account_name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
    },
    List {
        #[arg(long)]
        account_name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
    },
    Delete {
        #[arg(long)]
        account_name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
    },
    /// Set the fixed target node count (nodes beyond it are removed, newest first).
    Resize {
        #[arg(long)]
        account_name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long)]
        target_dedicated_nodes: u64,
    },
    /// A one-time token with which a host agent joins the pool as a node.
    JoinToken {
        #[arg(long)]
        account_name: String,
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
    },
}

pub async fn batch(c: BatchCmd) -> Result<(), CliError> {
    let api = Api::connect(&c.conn).await?;
    let account = |rg: &str, n: &str| api.res_path(rg, BATCH_ACCOUNT_TYPE, n, BATCH_API);
    let pool = |rg: &str, a: &str, p: Option<&str>, action: Option<&str>| {
        api.sub_path(
            rg,
            BATCH_ACCOUNT_TYPE,
            a,
            &[Some("pools"), p, action],
            BATCH_API,
        )
    };
    let v = match c.cmd {
        BatchVerb::Account { verb } => match verb {
            BatchAccountVerb::Create {
                name,
                resource_group,
                location,
            } => {
                api.call(
                    reqwest::Method::PUT,
                    &account(&resource_group, &name),
                    Some(json!({"location": location})),
                )
                .await?
            }
            BatchAccountVerb::Show {
                name,
                resource_group,
            } => {
                api.call(reqwest::Method::GET, &account(&resource_group, &name), None)
                    .await?
            }
            BatchAccountVerb::List { resource_group } => {
                api.list(resource_group.as_deref(), BATCH_ACCOUNT_TYPE, BATCH_API)
                    .await?
            }
            BatchAccountVerb::Delete {
                name,
                resource_group,
            } => {
                api.call(
                    reqwest::Method::DELETE,
                    &account(&resource_group, &name),
                    None,
                )
                .await?;
                return Ok(());
            }
        },
        BatchVerb::Pool { verb } => match verb {
            BatchPoolVerb::Create {
                account_name,
                resource_group,
                name,
                body,
            } => {
                let text = if body == "-" {
                    let mut t = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut t).map_err(
                        |source| CliError::Io {
                            path: "-".into(),
                            source,
                        },
                    )?;
                    t
                } else {
                    std::fs::read_to_string(&body).map_err(|source| CliError::Io {
                        path: body.clone(),
                        source,
                    })?
                };
                let b: Value = serde_json::from_str(&text)
                    .map_err(|e| CliError::Usage(format!("{body}: invalid JSON: {e}")))?;
                // accept the request body, or the whole example document with "parameters"
                let b = b.pointer("/parameters/parameters").cloned().unwrap_or(b);
                api.call(
                    reqwest::Method::PUT,
                    &pool(&resource_group, &account_name, Some(&name), None),
                    Some(b),
                )
                .await?
            }
            BatchPoolVerb::Show {
                account_name,
                resource_group,
                name,
            } => {
                api.call(
                    reqwest::Method::GET,
                    &pool(&resource_group, &account_name, Some(&name), None),
                    None,
                )
                .await?
            }
            BatchPoolVerb::List {
                account_name,
                resource_group,
            } => {
                api.list_all(&pool(&resource_group, &account_name, None, None))
                    .await?
            }
            BatchPoolVerb::Delete {
                account_name,
                resource_group,
                name,
            } => {
                api.call(
                    reqwest::Method::DELETE,
                    &pool(&resource_group, &account_name, Some(&name), None),
                    None,
                )
                .await?;
                return Ok(());
            }
            BatchPoolVerb::Resize {
                account_name,
                resource_group,
                name,
                target_dedicated_nodes,
            } => {
                let body = json!({"properties": {"scaleSettings": {"fixedScale": {"targetDedicatedNodes": target_dedicated_nodes}}}});
                api.call(
                    reqwest::Method::PATCH,
                    &pool(&resource_group, &account_name, Some(&name), None),
                    Some(body),
                )
                .await?
            }
            BatchPoolVerb::JoinToken {
                account_name,
                resource_group,
                name,
                expires_in,
            } => {
                api.call(
                    reqwest::Method::POST,
                    &pool(
                        &resource_group,
                        &account_name,
                        Some(&name),
                        Some("generateJoinToken"),
                    ),
                    Some(json!({"expiresInSeconds": expires_in})),
                )
                .await?
            }
        },
    };
    api.print(&v);
    Ok(())
}

// ------------------------------------------------------------------ aks

const CONTAINER_API: &str = "2026-08-01";
const CLUSTER_TYPE: &str = "Microsoft.ContainerService/managedClusters";
/// "Managed Identity Operator" (read and assign user-assigned identities).
const MANAGED_IDENTITY_OPERATOR: &str = "f1a07417-d97a-45cb-824c-7a7467783830";

#[derive(Args)]
pub struct AksCmd {
    #[command(subcommand)]
    cmd: AksVerb,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Clone, Copy, ValueEnum)]
enum NetworkPluginArg {
    Azure,
    Kubenet,
}

#[derive(Subcommand)]
enum AksVerb {
    /// Create a managed cluster: a node resource group with one scale set per pool (nodes are
    /// host agents that join with `aks nodepool join-token`) and the kubelet identity.
    Create {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        /// Default: the resource group's location.
        #[arg(short = 'l', long)]
        location: Option<String>,
        #[arg(short = 'c', long, default_value_t = 3)]
        node_count: u64,
        #[arg(long, default_value = "nodepool1")]
        nodepool_name: String,
        #[arg(short = 's', long, default_value = "Standard_DS2_v2")]
        node_vm_size: String,
        #[arg(short = 'k', long)]
        kubernetes_version: Option<String>,
        #[arg(long)]
        dns_name_prefix: Option<String>,
        /// Default: azure (with --enable-pod-identity-with-kubenet: kubenet).
        #[arg(long, value_enum)]
        network_plugin: Option<NetworkPluginArg>,
        #[arg(long)]
        node_resource_group: Option<String>,
        #[arg(long)]
        enable_pod_identity: bool,
        /// Allow pod identity on kubenet despite the IP spoofing risk.
        #[arg(long)]
        enable_pod_identity_with_kubenet: bool,
        /// A user-assigned identity (id) as the cluster's identity (default: system-assigned).
        #[arg(long)]
        assign_identity: Option<String>,
        /// Give the cluster an OIDC issuer served by Keyless (cannot be disabled later).
        #[arg(long)]
        enable_oidc_issuer: bool,
        /// Enable workload identity (needs --enable-oidc-issuer).
        #[arg(long)]
        enable_workload_identity: bool,
        /// Accepted for az compatibility (clusters always have a managed identity).
        #[arg(long)]
        enable_managed_identity: bool,
        /// Accepted for az compatibility.
        #[arg(long)]
        generate_ssh_keys: bool,
        /// Accepted for az compatibility (the create is done when it returns).
        #[arg(long)]
        no_wait: bool,
        #[arg(long, num_args = 0..)]
        tags: Vec<String>,
    },
    /// Update a cluster: turn the pod identity add-on on or off, enable the OIDC issuer, turn
    /// workload identity on or off, tags.
    Update {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long, conflicts_with = "disable_pod_identity")]
        enable_pod_identity: bool,
        #[arg(long)]
        disable_pod_identity: bool,
        #[arg(long)]
        enable_pod_identity_with_kubenet: bool,
        /// Give the cluster an OIDC issuer served by Keyless (cannot be disabled later).
        #[arg(long)]
        enable_oidc_issuer: bool,
        /// Enable workload identity (needs the OIDC issuer: already enabled, or
        /// --enable-oidc-issuer).
        #[arg(long, conflicts_with = "disable_workload_identity")]
        enable_workload_identity: bool,
        #[arg(long)]
        disable_workload_identity: bool,
        #[arg(long)]
        no_wait: bool,
        #[arg(long, num_args = 0..)]
        tags: Option<Vec<String>>,
    },
    Show {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
    },
    List {
        #[arg(short = 'g', long)]
        resource_group: Option<String>,
    },
    /// Delete a cluster with its node resource group and everything in it.
    Delete {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(short = 'y', long)]
        yes: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Node pools.
    Nodepool {
        #[command(subcommand)]
        verb: NodepoolVerb,
    },
    /// Pod identities of the pod identity add-on (read-modify-write of the cluster, as az).
    PodIdentity {
        #[command(subcommand)]
        verb: PodIdentityVerb,
    },
}

#[derive(Subcommand)]
enum NodepoolVerb {
    /// Issue a one-time join token: `keyless node --join-token` makes the host a node of the pool.
    JoinToken {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        cluster_name: String,
        #[arg(short = 'n', long)]
        name: String,
        /// Lifetime in seconds.
        #[arg(long, visible_alias = "expires-in", default_value_t = 3600)]
        ttl: u64,
    },
    List {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        cluster_name: String,
    },
}

#[derive(Subcommand)]
enum PodIdentityVerb {
    /// Add a pod identity (grants the cluster identity Managed Identity Operator on the
    /// identity first when it lacks it, as az does).
    Add {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        cluster_name: String,
        #[arg(long)]
        namespace: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long)]
        identity_resource_id: String,
        #[arg(long)]
        binding_selector: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    Delete {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        cluster_name: String,
        #[arg(long)]
        namespace: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the cluster (its podIdentityProfile lists the pod identities), as az does.
    List {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        cluster_name: String,
    },
    /// Pod identity exceptions (pods that keep the node's own IMDS answer).
    Exception {
        #[command(subcommand)]
        verb: ExceptionVerb,
    },
    /// Why a pod gets (or does not get) an identity through NMI: the pod, its label, the
    /// bindings and identities considered and why each counts or not, exceptions, the
    /// assignment in standard mode, and (from the agent of the pod's node) its last refusals.
    /// Plain text; `-o json` for JSON.
    Explain(crate::explain::ExplainArgs),
}

#[derive(Subcommand)]
enum ExceptionVerb {
    Add {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        cluster_name: String,
        #[arg(long)]
        namespace: String,
        #[arg(short = 'n', long)]
        name: String,
        /// Labels `key=value` ...
        #[arg(long, num_args = 1.., required = true)]
        pod_labels: Vec<String>,
        #[arg(long)]
        no_wait: bool,
    },
    Delete {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        cluster_name: String,
        #[arg(long)]
        namespace: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    Update {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        cluster_name: String,
        #[arg(long)]
        namespace: String,
        #[arg(short = 'n', long)]
        name: String,
        #[arg(long, num_args = 1.., required = true)]
        pod_labels: Vec<String>,
        #[arg(long)]
        no_wait: bool,
    },
    List {
        #[arg(short = 'g', long)]
        resource_group: String,
        #[arg(long)]
        cluster_name: String,
    },
}

/// `key=value` pairs (both required).
fn parse_labels(labels: &[String]) -> Result<Value, CliError> {
    let mut m = serde_json::Map::new();
    for l in labels {
        match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                m.insert(k.to_string(), json!(v));
            }
            _ => {
                return Err(CliError::Usage(format!(
                    "invalid pod label '{l}': use key=value"
                )))
            }
        }
    }
    Ok(Value::Object(m))
}

fn same_entry(e: &Value, namespace: &str, name: &str) -> bool {
    e["namespace"].as_str() == Some(namespace) && e["name"].as_str() == Some(name)
}

/// Append `entry` to the profile's list `list` (`userAssignedIdentities`, `…Exceptions`).
fn push_entry(profile: &mut Value, list: &str, entry: Value) {
    match profile[list].as_array_mut() {
        Some(l) => l.push(entry),
        None => profile[list] = json!([entry]),
    }
}

/// Drop the entry `namespace`/`name` from the profile's list `list`.
fn drop_entry(profile: &mut Value, list: &str, namespace: &str, name: &str) {
    if let Some(l) = profile[list].as_array_mut() {
        l.retain(|e| !same_entry(e, namespace, name));
    }
}

impl Api {
    fn cluster_path(&self, rg: &str, name: &str) -> String {
        self.res_path(rg, CLUSTER_TYPE, name, CONTAINER_API)
    }

    async fn get_cluster(&self, rg: &str, name: &str) -> Result<Value, CliError> {
        self.call(reqwest::Method::GET, &self.cluster_path(rg, name), None)
            .await
    }

    async fn put_cluster(&self, rg: &str, name: &str, body: Value) -> Result<Value, CliError> {
        self.call(
            reqwest::Method::PUT,
            &self.cluster_path(rg, name),
            Some(body),
        )
        .await
    }

    /// az's read-modify-write of the whole cluster: GET, `edit` its (enabled)
    /// podIdentityProfile, PUT.
    async fn edit_profile(
        &self,
        rg: &str,
        name: &str,
        edit: impl FnOnce(&mut Value) -> Result<(), CliError>,
    ) -> Result<Value, CliError> {
        let mut cluster = self.get_cluster(rg, name).await?;
        edit(Self::enabled_profile(&mut cluster)?)?;
        self.put_cluster(rg, name, cluster).await
    }

    /// The cluster's podIdentityProfile, which must be enabled (az checks the same first).
    fn enabled_profile(cluster: &mut Value) -> Result<&mut Value, CliError> {
        let p = &mut cluster["properties"]["podIdentityProfile"];
        if p["enabled"].as_bool() != Some(true) {
            return Err(CliError::Usage(
                "The pod identity addon is not enabled for this managed cluster yet. Please use `keyless aks update --enable-pod-identity` to enable it.".into(),
            ));
        }
        Ok(p)
    }

    /// Make sure `principal` holds Managed Identity Operator on `scope` (at or above it);
    /// assign it at `scope` when not.
    async fn ensure_identity_operator(&self, principal: &str, scope: &str) -> Result<(), CliError> {
        let f = serde_urlencoded::to_string([(
            "$filter",
            format!("atScope() and principalId eq '{principal}'"),
        )])
        .unwrap_or_default();
        let list = self
            .list_all(&format!("{scope}/providers/Microsoft.Authorization/roleAssignments?api-version={AUTHZ_API}&{f}"))
            .await?;
        let held = list
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| same_role(a, MANAGED_IDENTITY_OPERATOR));
        if held {
            return Ok(());
        }
        let role = format!(
            "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{MANAGED_IDENTITY_OPERATOR}",
            self.subscription
        );
        let path = format!(
            "{scope}/providers/Microsoft.Authorization/roleAssignments/{}?api-version={AUTHZ_API}",
            uuid::Uuid::new_v4()
        );
        let body = json!({"properties": {"roleDefinitionId": role, "principalId": principal, "principalType": "ServicePrincipal"}});
        match self.call(reqwest::Method::PUT, &path, Some(body)).await {
            Ok(_) => Ok(()),
            Err(CliError::Remote { code, .. }) if code == "RoleAssignmentExists" => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// az's own refusal of workload identity without the OIDC issuer.
const WI_NEEDS_ISSUER: &str =
    "Enabling workload identity requires enabling OIDC issuer (--enable-oidc-issuer).";

/// A cluster as az prints it: az shows the SDK's model, whose `oidcIssuerProfile` field is
/// `issuerUrl` (the wire's `issuerURL`), so `--query oidcIssuerProfile.issuerUrl` finds it.
fn az_cluster(mut v: Value) -> Value {
    if let Some(p) = v
        .pointer_mut("/properties/oidcIssuerProfile")
        .and_then(Value::as_object_mut)
    {
        if let Some(u) = p.remove("issuerURL") {
            p.insert("issuerUrl".into(), u);
        }
    }
    v
}

/// The principal the cluster acts as (system-assigned, or its one user-assigned identity).
fn cluster_principal(cluster: &Value) -> Option<String> {
    let idn = &cluster["identity"];
    idn["principalId"].as_str().map(str::to_string).or_else(|| {
        idn["userAssignedIdentities"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(|u| u["principalId"].as_str())
            .map(str::to_string)
    })
}

pub async fn aks(c: AksCmd) -> Result<(), CliError> {
    if let AksVerb::PodIdentity {
        verb: PodIdentityVerb::Explain(a),
    } = c.cmd
    {
        // the API server (and the node's agent) answer; ARM only for a cluster's profile
        let conn = c.conn.clone();
        let profile = match (&a.resource_group, &a.cluster_name) {
            (Some(rg), Some(name)) => {
                let api = Api::connect(&conn).await?;
                Some(api.get_cluster(rg, name).await?)
            }
            _ => None,
        };
        let json = matches!(conn.output, Some(Output::Json));
        return crate::explain::run(a, profile, json).await;
    }
    let api = Api::connect(&c.conn).await?;
    let v = match c.cmd {
        AksVerb::Create {
            resource_group,
            name,
            location,
            node_count,
            nodepool_name,
            node_vm_size,
            kubernetes_version,
            dns_name_prefix,
            network_plugin,
            node_resource_group,
            enable_pod_identity,
            enable_pod_identity_with_kubenet,
            assign_identity,
            enable_oidc_issuer,
            enable_workload_identity,
            tags,
            ..
        } => {
            if enable_workload_identity && !enable_oidc_issuer {
                return Err(CliError::Usage(WI_NEEDS_ISSUER.into()));
            }
            let location = match location {
                Some(l) => l,
                None => {
                    let rg = api
                        .call(
                            reqwest::Method::GET,
                            &format!(
                                "{}?api-version={RESOURCES_API}",
                                api.rg_path(&resource_group)
                            ),
                            None,
                        )
                        .await?;
                    rg["location"].as_str().unwrap_or("local").to_string()
                }
            };
            let mut props = json!({
                "agentPoolProfiles": [{
                    "name": nodepool_name,
                    "count": node_count,
                    "vmSize": node_vm_size,
                    "mode": "System",
                    "osType": "Linux",
                    "type": "VirtualMachineScaleSets",
                }],
            });
            // az once defaulted to kubenet; asking for pod identity on kubenet means kubenet
            let plugin = match (network_plugin, enable_pod_identity_with_kubenet) {
                (Some(NetworkPluginArg::Azure), _) => Some("azure"),
                (Some(NetworkPluginArg::Kubenet), _) | (None, true) => Some("kubenet"),
                (None, false) => None,
            };
            if let Some(p) = plugin {
                props["networkProfile"] = json!({"networkPlugin": p});
            }
            for (k, v) in [
                ("kubernetesVersion", kubernetes_version),
                ("dnsPrefix", dns_name_prefix),
                ("nodeResourceGroup", node_resource_group),
            ] {
                if let Some(v) = v {
                    props[k] = json!(v);
                }
            }
            if enable_pod_identity {
                props["podIdentityProfile"] = json!({
                    "enabled": true,
                    "allowNetworkPluginKubenet": enable_pod_identity_with_kubenet,
                });
            }
            if enable_oidc_issuer {
                props["oidcIssuerProfile"] = json!({"enabled": true});
            }
            if enable_workload_identity {
                props["securityProfile"] = json!({"workloadIdentity": {"enabled": true}});
            }
            let identity = match assign_identity {
                Some(id) => json!({"type": "UserAssigned", "userAssignedIdentities": {id: {}}}),
                None => json!({"type": "SystemAssigned"}),
            };
            let body = json!({"location": location, "tags": parse_tags(&tags)?,
                              "identity": identity, "properties": props});
            az_cluster(api.put_cluster(&resource_group, &name, body).await?)
        }
        AksVerb::Update {
            resource_group,
            name,
            enable_pod_identity,
            disable_pod_identity,
            enable_pod_identity_with_kubenet,
            enable_oidc_issuer,
            enable_workload_identity,
            disable_workload_identity,
            tags,
            ..
        } => {
            let mut cluster = api.get_cluster(&resource_group, &name).await?;
            // as az: the issuer only ever turned on; workload identity needs it (asked now,
            // or already on)
            let issuer_on = cluster["properties"]["oidcIssuerProfile"]["enabled"] == json!(true);
            if enable_workload_identity && !(enable_oidc_issuer || issuer_on) {
                return Err(CliError::Usage(WI_NEEDS_ISSUER.into()));
            }
            if enable_oidc_issuer {
                cluster["properties"]["oidcIssuerProfile"]["enabled"] = json!(true);
            }
            if enable_workload_identity || disable_workload_identity {
                let sp = &mut cluster["properties"]["securityProfile"];
                if !sp.is_object() {
                    *sp = json!({});
                }
                sp["workloadIdentity"] = json!({"enabled": enable_workload_identity});
            }
            if enable_pod_identity {
                let p = &mut cluster["properties"]["podIdentityProfile"];
                if p["enabled"].as_bool() == Some(true) {
                    if enable_pod_identity_with_kubenet {
                        p["allowNetworkPluginKubenet"] = json!(true);
                    }
                } else {
                    *p = json!({"enabled": true, "allowNetworkPluginKubenet": enable_pod_identity_with_kubenet});
                }
            } else if disable_pod_identity {
                cluster["properties"]["podIdentityProfile"] = json!({"enabled": false});
            } else if enable_pod_identity_with_kubenet {
                return Err(CliError::Usage(
                    "--enable-pod-identity-with-kubenet goes with --enable-pod-identity".into(),
                ));
            }
            if let Some(t) = tags {
                cluster["tags"] = parse_tags(&t)?;
            }
            az_cluster(api.put_cluster(&resource_group, &name, cluster).await?)
        }
        AksVerb::Show {
            resource_group,
            name,
        } => az_cluster(api.get_cluster(&resource_group, &name).await?),
        AksVerb::List { resource_group } => {
            match api
                .list(resource_group.as_deref(), CLUSTER_TYPE, CONTAINER_API)
                .await?
            {
                Value::Array(a) => Value::Array(a.into_iter().map(az_cluster).collect()),
                other => other,
            }
        }
        AksVerb::Delete {
            resource_group,
            name,
            ..
        } => {
            api.call(
                reqwest::Method::DELETE,
                &api.cluster_path(&resource_group, &name),
                None,
            )
            .await?;
            return Ok(());
        }
        AksVerb::Nodepool { verb } => match verb {
            NodepoolVerb::JoinToken {
                resource_group,
                cluster_name,
                name,
                ttl,
            } => {
                let p = api.sub_path(
                    &resource_group,
                    CLUSTER_TYPE,
                    &cluster_name,
                    &[Some("agentPools"), Some(&name), Some("generateJoinToken")],
                    CONTAINER_API,
                );
                api.call(
                    reqwest::Method::POST,
                    &p,
                    Some(json!({"expiresInSeconds": ttl})),
                )
                .await?
            }
            NodepoolVerb::List {
                resource_group,
                cluster_name,
            } => api.get_cluster(&resource_group, &cluster_name).await?["properties"]
                ["agentPoolProfiles"]
                .clone(),
        },
        AksVerb::PodIdentity { verb } => pod_identity(&api, verb).await?,
    };
    api.print(&v);
    Ok(())
}

async fn pod_identity(api: &Api, verb: PodIdentityVerb) -> Result<Value, CliError> {
    Ok(match verb {
        PodIdentityVerb::Add {
            resource_group,
            cluster_name,
            namespace,
            name,
            identity_resource_id,
            binding_selector,
            ..
        } => {
            let mut cluster = api.get_cluster(&resource_group, &cluster_name).await?;
            Api::enabled_profile(&mut cluster)?;
            let ident = api
                .call(
                    reqwest::Method::GET,
                    &format!("{identity_resource_id}?api-version={MSI_API}"),
                    None,
                )
                .await?;
            let principal = cluster_principal(&cluster)
                .ok_or_else(|| CliError::Usage("the cluster has no managed identity".into()))?;
            let scope = ident["id"]
                .as_str()
                .unwrap_or(&identity_resource_id)
                .to_string();
            api.ensure_identity_operator(&principal, &scope).await?;
            let mut entry = json!({
                "name": name,
                "namespace": namespace,
                "identity": {
                    "resourceId": scope,
                    "clientId": ident["properties"]["clientId"],
                    "objectId": ident["properties"]["principalId"],
                },
            });
            if let Some(b) = binding_selector {
                entry["bindingSelector"] = json!(b);
            }
            push_entry(
                Api::enabled_profile(&mut cluster)?,
                "userAssignedIdentities",
                entry,
            );
            api.put_cluster(&resource_group, &cluster_name, cluster)
                .await?
        }
        PodIdentityVerb::Delete {
            resource_group,
            cluster_name,
            namespace,
            name,
            ..
        } => {
            api.edit_profile(&resource_group, &cluster_name, |p| {
                drop_entry(p, "userAssignedIdentities", &namespace, &name);
                Ok(())
            })
            .await?
        }
        PodIdentityVerb::List {
            resource_group,
            cluster_name,
        } => api.get_cluster(&resource_group, &cluster_name).await?,
        PodIdentityVerb::Explain(_) => {
            return Err(CliError::Usage(
                "explain is answered before connecting".into(),
            ))
        }
        PodIdentityVerb::Exception { verb } => match verb {
            ExceptionVerb::Add {
                resource_group,
                cluster_name,
                namespace,
                name,
                pod_labels,
                ..
            } => {
                let labels = parse_labels(&pod_labels)?;
                let entry = json!({"name": name, "namespace": namespace, "podLabels": labels});
                api.edit_profile(&resource_group, &cluster_name, |p| {
                    push_entry(p, "userAssignedIdentityExceptions", entry);
                    Ok(())
                })
                .await?
            }
            ExceptionVerb::Delete {
                resource_group,
                cluster_name,
                namespace,
                name,
                ..
            } => {
                api.edit_profile(&resource_group, &cluster_name, |p| {
                    drop_entry(p, "userAssignedIdentityExceptions", &namespace, &name);
                    Ok(())
                })
                .await?
            }
            ExceptionVerb::Update {
                resource_group,
                cluster_name,
                namespace,
                name,
                pod_labels,
                ..
            } => {
                let labels = parse_labels(&pod_labels)?;
                api.edit_profile(&resource_group, &cluster_name, |p| {
                    let found = p["userAssignedIdentityExceptions"]
                        .as_array_mut()
                        .and_then(|l| l.iter_mut().find(|e| same_entry(e, &namespace, &name)))
                        .ok_or_else(|| {
                            CliError::Usage(format!(
                                "pod identity exception {namespace}/{name} not found"
                            ))
                        })?;
                    found["podLabels"] = labels;
                    Ok(())
                })
                .await?
            }
            ExceptionVerb::List {
                resource_group,
                cluster_name,
            } => api.get_cluster(&resource_group, &cluster_name).await?,
        },
    })
}
