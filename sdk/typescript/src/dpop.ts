/**
 * RFC 9449 DPoP: a key pair held in memory (the private key is not
 * extractable), the public JWK the broker binds a token to (`cnf.jkt`), and
 * a proof per request.
 */
import { createHash, randomBytes } from "node:crypto";
import type { CryptoKey, JWK } from "jose";
import { calculateJwkThumbprint, exportJWK, generateKeyPair, SignJWT } from "jose";

function b64url(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString("base64url");
}

/** RFC 9449 §4.3: the `htu` of a request, without its query and fragment. */
export function htu(url: string | URL): string {
  const u = new URL(url);
  u.search = "";
  u.hash = "";
  return u.toString();
}

/** A DPoP key (EC P-256, ES256). Make one with `DpopKey.generate()`. */
export class DpopKey {
  readonly #privateKey: CryptoKey;

  private constructor(
    privateKey: CryptoKey,
    /** The public JWK, as the broker is sent it. */
    readonly publicJwk: JWK,
    /** Its RFC 7638 thumbprint: a bound token's `cnf.jkt`. */
    readonly jkt: string,
  ) {
    this.#privateKey = privateKey;
  }

  static async generate(): Promise<DpopKey> {
    const { publicKey, privateKey } = await generateKeyPair("ES256");
    const jwk = await exportJWK(publicKey);
    const pub: JWK = { kty: jwk.kty, crv: jwk.crv, x: jwk.x, y: jwk.y };
    return new DpopKey(privateKey, pub, await calculateJwkThumbprint(pub, "sha256"));
  }

  /** A proof for one request (`method`, `url`), with `ath` when `accessToken` is given. */
  async proof(method: string, url: string | URL, accessToken?: string): Promise<string> {
    const claims: Record<string, string> = { htm: method.toUpperCase(), htu: htu(url) };
    if (accessToken !== undefined) {
      claims.ath = b64url(createHash("sha256").update(accessToken).digest());
    }
    return new SignJWT(claims)
      .setProtectedHeader({ alg: "ES256", typ: "dpop+jwt", jwk: this.publicJwk })
      .setIssuedAt()
      .setJti(b64url(randomBytes(16)))
      .sign(this.#privateKey);
  }

  toString(): string {
    return `DpopKey(${this.jkt})`;
  }
  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return this.toString();
  }
}
