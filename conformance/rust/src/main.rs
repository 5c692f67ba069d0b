//! Get a token with the real `azure_identity` crate's `ManagedIdentityCredential` and print it
//! as JSON. The crate has no IMDS override: it always calls 169.254.169.254 with
//! api-version 2019-08-01, so the conformance suite runs this inside a network namespace.
//!
//! Usage: keyless-conformance-rust <system|client_id|object_id|resource_id> <value|-> <scope>

use azure_core::credentials::TokenCredential;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (kind, value, scope) = match args.as_slice() {
        [_, k, v, s] => (k.as_str(), v.clone(), s.as_str()),
        _ => {
            eprintln!("usage: keyless-conformance-rust <system|client_id|object_id|resource_id> <value|-> <scope>");
            std::process::exit(2);
        }
    };
    let user_assigned_id = match kind {
        "client_id" => Some(UserAssignedId::ClientId(value)),
        "object_id" => Some(UserAssignedId::ObjectId(value)),
        "resource_id" => Some(UserAssignedId::ResourceId(value)),
        _ => None,
    };
    let options = ManagedIdentityCredentialOptions {
        user_assigned_id,
        ..Default::default()
    };
    let out = match ManagedIdentityCredential::new(Some(options)) {
        Err(e) => json!({"error": "construct", "message": e.to_string()}),
        Ok(cred) => match cred.get_token(&[scope], None).await {
            Err(e) => json!({"error": format!("{:?}", e.kind()), "message": e.to_string()}),
            Ok(t) => {
                let again = cred
                    .get_token(&[scope], None)
                    .await
                    .map(|a| a.token.secret().to_string());
                json!({
                    "token": t.token.secret(),
                    "expires_on": t.expires_on.unix_timestamp(),
                    "second_token_same": again.ok().as_deref() == Some(t.token.secret()),
                })
            }
        },
    };
    println!("{out}");
}
