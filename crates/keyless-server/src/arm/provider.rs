//! What a resource provider is to the ARM edge: one [`Provider`] per resource type (namespace +
//! type name), with its api-versions and its handlers — the collection, the resource itself,
//! child resources by child type name, and actions by name and method. Each provider module
//! declares its own entries next to its handlers; [`crate::arm::registry`] lists them, and the
//! router ([`crate::arm`]) does the generic part of every request once (api-version,
//! subscription, authorization, the node-resource-group lockdown, ETags) before it calls one.
//!
//! A leaf: it knows no provider and not the router, so provider modules can name these types
//! and the registry can name the providers without an import circle.

use crate::error::{Result, ServerError};
use crate::request::Caller;
use crate::state::AppState;
use axum::http::Method;
use axum::response::Response;
use keyless_core::api_version;
use keyless_core::resource_id::ResourceId;
use keyless_store::Tx;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;

/// The future a handler answers with.
pub type Reply<'a, R = Response> = Pin<Box<dyn Future<Output = Result<R>> + Send + 'a>>;

/// A handler of requests on targets `T` (a collection, a resource, a child), answering `R`, in
/// the request's unit of work (never committed by the handler). Written with [`handler!`] from
/// an `async fn(&AppState, &mut Tx, &Call<'_, T>) -> Result<R>`.
pub type Handler<T, R = Response> =
    for<'a> fn(&'a AppState, &'a mut Tx, &'a Call<'a, T>) -> Reply<'a, R>;

/// A [`Handler`] from an async fn taking `(&AppState, &mut Tx, &Call<'_, T>)`.
macro_rules! handler {
    ($f:path) => {
        |s, tx, c| ::std::boxed::Box::pin($f(s, tx, c))
    };
}
pub(crate) use handler;

/// One request as a handler sees it, already checked by the router: its api-version is one
/// the provider serves, its subscription is ours, the caller holds the entry's action.
pub struct Call<'a, T> {
    /// The provider of the request's resource type (for a child or an action: its parent's).
    pub provider: &'static Provider,
    /// What the request names.
    pub target: &'a T,
    pub caller: &'a Caller,
    pub method: &'a Method,
    /// `api-version`.
    pub version: &'a str,
    pub query: &'a [(String, String)],
    pub body: &'a [u8],
    /// Whether the write claim on the parent's children is held (a PUT of a federated
    /// identity credential, see [`crate::arm::fics::claim_writes`]).
    pub write_claimed: bool,
    /// Every resource type served (the registry's), for a handler that names resources of
    /// other types (a deployment's preflight) without importing the registry.
    pub providers: &'static [&'static Provider],
    /// Reads of resources of any type in the request's unit of work, as their own routes answer
    /// them (a deployment's what-if); None where the caller of the handler is no route.
    pub reads: Option<&'static Reads>,
}

/// What a resource's GET answered.
pub enum Read {
    Found(Value),
    /// 404: it (or its resource group) does not exist.
    Missing,
    /// Any other answer: its status and error code.
    Refused(u16, String),
}

/// Reads the router gives a handler that looks at resources of other types, so that the
/// provider module never imports the router.
pub struct Reads {
    /// The resource `id` as its GET at `api-version` answers the caller.
    pub get: for<'a> fn(&'a AppState, &'a mut Tx, &'a Caller, &'a str, &'a str) -> Reply<'a, Read>,
    /// Every resource in a resource group (`subscription`, `group`), as the generic list has
    /// them.
    pub in_group: for<'a> fn(&'a AppState, &'a mut Tx, &'a str, &'a str) -> Reply<'a, Vec<Value>>,
}

/// A collection of one type: a subscription's, or a resource group's.
pub struct Collection {
    pub subscription: String,
    pub resource_group: Option<String>,
}

/// A child resource: `{parent}/{child type}/{name}`.
pub struct ChildId {
    pub parent: ResourceId,
    pub name: String,
}

/// Whether a resource of some type exists (a role assignment's scope), as its GET would find it
/// (404 otherwise).
pub type Exists = for<'a> fn(&'a AppState, &'a mut Tx, &'a ResourceId) -> Reply<'a, ()>;

/// A resource type served by a provider.
pub struct Provider {
    /// Canonical spelling of the namespace (`Microsoft.KeyVault`); matched case-insensitively.
    pub namespace: &'static str,
    /// Canonical spelling of the type (`vaults`); matched case-insensitively.
    pub type_name: &'static str,
    /// The api-versions served, oldest first (as the error that refuses another lists them).
    pub api_versions: &'static [&'static str],
    /// Which api-versions are accepted when not exactly [`Provider::api_versions`] (a range).
    pub accepts: Option<fn(&str) -> bool>,
    /// GET of the collection (a subscription's, a resource group's): every resource, of which
    /// the router keeps those the caller may read.
    pub list: Handler<Collection, Vec<Value>>,
    /// The resource itself; `{namespace}/{type}/{verb}` is authorized on it first.
    pub resource: Methods,
    /// Child resources, by child type name.
    pub children: &'static [Child],
    /// Actions on the resource (`{resource}/{name}`), including a list of children served as
    /// an action path.
    pub actions: &'static [Action<ResourceId>],
    /// The table whose row (by `key`) a conditional write of the resource, or of one of its
    /// children, locks before reading the current ETag ([`crate::arm::etag`]).
    pub row: Option<&'static str>,
    /// The first api-version whose body carries the ETag as `etag` (besides the header).
    pub etag_in_body_since: Option<&'static str>,
    /// Whether a role assignment may be scoped to a resource of this type: how to find it.
    pub role_scope: Option<Exists>,
}

/// The handlers of one resource, by method; a method without one is answered 405.
pub struct Methods {
    pub get: Option<Handler<ResourceId>>,
    pub head: Option<Handler<ResourceId>>,
    pub put: Option<Handler<ResourceId>>,
    pub patch: Option<Handler<ResourceId>>,
    pub delete: Option<Handler<ResourceId>>,
}

impl Methods {
    /// No method served (to complete a literal: `Methods { get: …, ..Methods::NONE }`).
    pub const NONE: Methods = Methods {
        get: None,
        head: None,
        put: None,
        patch: None,
        delete: None,
    };

    /// The handler of `m`, if any.
    pub fn of(&self, m: &Method) -> Option<Handler<ResourceId>> {
        match *m {
            Method::GET => self.get,
            Method::HEAD => self.head,
            Method::PUT => self.put,
            Method::PATCH => self.patch,
            Method::DELETE => self.delete,
            _ => None,
        }
    }
}

/// A child type of a resource type (`pools` of a Batch account).
pub struct Child {
    /// Canonical spelling, matched case-insensitively.
    pub type_name: &'static str,
    /// One child as a resource (`{parent}/{type}/{name}`), if it is served as one.
    pub resource: Option<ChildResource>,
    /// Actions on one child (`{parent}/{type}/{name}/{action}`).
    pub actions: &'static [Action<ChildId>],
}

/// The requests on one child resource.
pub struct ChildResource {
    /// What the router authorizes before the handler runs.
    pub access: Access,
    /// Whether a write is refused in a managed cluster's node resource group.
    pub lockdown: bool,
    /// Every method (the handler answers 405 to those it does not serve).
    pub handler: Handler<ChildId>,
}

/// What the router authorizes for a child resource, with `{parent namespace}/{parent type}/
/// {child type}/{verb}` as the action (`verb` from the method: read, write, delete, action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The action of the method on the child itself (`{parent}/{child type}/{name}`).
    Child,
    /// The action of the method on the parent, for a write only: the handler authorizes reads.
    ParentOnWrite,
    /// `…/write` on the parent whatever the method: the child is an operation on its parent
    /// (a vault's `accessPolicies/{add|replace|remove}`).
    ParentWrite,
}

/// An action: `{target}/{name}` with one method.
pub struct Action<T: 'static> {
    /// Matched case-insensitively.
    pub name: &'static str,
    pub method: Method,
    /// The RBAC action the router checks on the target first; `None`: the handler authorizes.
    pub authorize: Option<&'static str>,
    /// Whether the action is refused in a managed cluster's node resource group.
    pub lockdown: bool,
    pub handler: Handler<T>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Provider({}/{})", self.namespace, self.type_name)
    }
}

impl Provider {
    /// `(namespace, type)`, canonical.
    pub fn resource_type(&self) -> (&'static str, &'static str) {
        (self.namespace, self.type_name)
    }

    /// `{namespace}/{type}/{verb}`.
    pub fn action(&self, verb: &str) -> String {
        format!("{}/{}/{verb}", self.namespace, self.type_name)
    }

    /// Ok when api-version `v` is served; `NoRegisteredProviderFound` otherwise.
    pub fn check_version(&self, v: &str) -> Result<()> {
        let ok = match self.accepts {
            Some(accepts) => accepts(v),
            None => api_version::is_supported(self.api_versions, v),
        };
        if ok {
            return Ok(());
        }
        Err(ServerError::NoRegisteredProviderFound {
            location: "local".into(),
            version: v.to_string(),
            type_name: self.type_name.to_string(),
            supported: self.api_versions.join(", "),
        })
    }

    /// The child type `name`, if any.
    pub fn child(&self, name: &str) -> Option<&'static Child> {
        self.children
            .iter()
            .find(|c| c.type_name.eq_ignore_ascii_case(name))
    }

    /// The action `name` with method `m` on the resource, if any.
    pub fn action_of(&self, name: &str, m: &Method) -> Option<&'static Action<ResourceId>> {
        find_action(self.actions, name, m)
    }
}

impl Child {
    /// The action `name` with method `m` on one child, if any.
    pub fn action_of(&self, name: &str, m: &Method) -> Option<&'static Action<ChildId>> {
        find_action(self.actions, name, m)
    }
}

/// The provider of resource type `namespace/type_name` (both case-insensitive) among
/// `providers`; `InvalidResourceType` when none serves it.
pub fn find(
    providers: &'static [&'static Provider],
    namespace: &str,
    type_name: &str,
) -> Result<&'static Provider> {
    providers
        .iter()
        .copied()
        .find(|p| {
            p.namespace.eq_ignore_ascii_case(namespace)
                && p.type_name.eq_ignore_ascii_case(type_name)
        })
        .ok_or_else(|| ServerError::InvalidResourceType {
            namespace: namespace.to_string(),
            type_name: type_name.to_string(),
        })
}

fn find_action<T>(
    actions: &'static [Action<T>],
    name: &str,
    m: &Method,
) -> Option<&'static Action<T>> {
    actions
        .iter()
        .find(|a| a.method == *m && a.name.eq_ignore_ascii_case(name))
}
