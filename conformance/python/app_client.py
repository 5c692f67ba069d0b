"""Get a token as a registered application with the real SDK credentials.

Usage: app_client.py '<json>' with kind ("secret" | "cert" | "cert_async"), authority, tenant,
client_id, secret or certificate_path, scope. Prints {"token": ...} or {"error", "message"}.
REQUESTS_CA_BUNDLE (sync) and SSL_CERT_FILE (aiohttp) must name the Keyless CA.
"""
import asyncio
import json
import sys


def main():
    a = json.loads(sys.argv[1])
    common = {"authority": a["authority"]}
    try:
        if a["kind"] == "secret":
            from azure.identity import ClientSecretCredential
            tok = ClientSecretCredential(a["tenant"], a["client_id"], a["secret"], disable_instance_discovery=True,
                                         **common).get_token(a["scope"])
        elif a["kind"] == "cert":
            from azure.identity import CertificateCredential
            tok = CertificateCredential(a["tenant"], a["client_id"], certificate_path=a["certificate_path"],
                                        disable_instance_discovery=True, **common).get_token(a["scope"])
        else:
            from azure.identity.aio import CertificateCredential

            async def get():
                async with CertificateCredential(a["tenant"], a["client_id"], certificate_path=a["certificate_path"],
                                                 **common) as cred:
                    return await cred.get_token(a["scope"])

            tok = asyncio.run(get())
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return
    print(json.dumps({"token": tok.token}))


if __name__ == "__main__":
    main()
