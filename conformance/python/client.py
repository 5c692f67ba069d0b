"""Run one real-SDK credential and print what it returned as JSON.

Usage: client.py '<json args>'. Args:
  credential: "mi" (ManagedIdentityCredential) | "dac" (DefaultAzureCredential), or
              "mi_async" / "dac_async" for the azure.identity.aio versions, or "wi"
              (WorkloadIdentityCredential)
  kwargs:     keyword arguments for the credential
  scope:      the scope to ask for
  verify:     optional {"authority": "https://host:port/<tenant>", "ca": "<pem path>", "audience": "..."}:
              discover the tenant's OIDC document, fetch its JWKS with PyJWKClient and verify the
              token (signature, aud, iss, exp) like a generic relying party would.

The process environment is the caller's choice (tests run it with a minimal one, or `env -i`),
because the SDK reads its configuration from the environment.
"""
import json
import ssl
import sys
import urllib.request


def verify(token, v):
    """Verify `token` like a generic relying party: OIDC discovery, JWKS, signature, aud, iss, exp."""
    import jwt

    ctx = ssl.create_default_context(cafile=v["ca"])
    with urllib.request.urlopen(v["authority"] + "/.well-known/openid-configuration", context=ctx) as r:
        oidc = json.load(r)
    jwks = jwt.PyJWKClient(oidc["jwks_uri"], ssl_context=ctx)
    key = jwks.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=v["audience"],
        issuer=oidc["issuer"],
        options={"require": ["exp", "iat", "nbf", "aud", "iss"]},
    )
    return claims, key.key_id


def main():
    args = json.loads(sys.argv[1])
    if "verify_token" in args:
        # verification only (of a token another client obtained)
        claims, kid = verify(args["verify_token"], args["verify"])
        print(json.dumps({"claims": claims, "kid": kid}))
        return
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    kwargs = args.get("kwargs", {})
    kind = args["credential"]
    if kind.endswith("_async"):
        # azure.identity.aio: its own IMDS client (not MSAL), identity_config keys sent verbatim
        import asyncio
        from azure.identity import aio

        async def get_twice():
            cls = aio.ManagedIdentityCredential if kind == "mi_async" else aio.DefaultAzureCredential
            async with cls(**kwargs) as cred:
                first = await cred.get_token(args["scope"])
                second = await cred.get_token(args["scope"])
                return first, second

        get = lambda: asyncio.run(get_twice())
    elif kind == "wi":
        from azure.identity import WorkloadIdentityCredential

        cred = WorkloadIdentityCredential(**kwargs)
        get = lambda: (cred.get_token(args["scope"]), cred.get_token(args["scope"]))
    else:
        cred = ManagedIdentityCredential(**kwargs) if kind == "mi" else DefaultAzureCredential(**kwargs)
        get = lambda: (cred.get_token(args["scope"]), cred.get_token(args["scope"]))
    try:
        tok, again = get()
    except Exception as e:  # the test asserts on the failure kind
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return
    out = {"token": tok.token, "expires_on": tok.expires_on}
    # a second call must be served from the SDK cache or the agent cache: same token
    out["second_token_same"] = again.token == tok.token
    if args.get("verify"):
        out["claims"], out["kid"] = verify(tok.token, args["verify"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
