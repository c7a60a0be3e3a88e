/**
 * The Verifier behind the official MCP TypeScript SDK's bearer-auth
 * middleware (`requireBearerAuth({ verifier: new OAuthTokenVerifier(v) })`).
 * Import as "@mayfly/sdk/mcp"; it needs `@modelcontextprotocol/sdk`.
 *
 * That middleware passes the token alone, so only bearer tokens can pass
 * here: a certificate- or DPoP-bound token is refused (`certificate_required`,
 * `dpop_required`), never accepted without its proof. A verifier that cannot
 * decide (no JWKS, a silent feed) is a server error: nothing passes.
 */
import { InvalidTokenError, ServerError } from "@modelcontextprotocol/sdk/server/auth/errors.js";
import type { OAuthTokenVerifier as McpTokenVerifier } from "@modelcontextprotocol/sdk/server/auth/provider.js";
import type { AuthInfo } from "@modelcontextprotocol/sdk/server/auth/types.js";
import { VerifyError } from "./errors.js";
import type { Verifier } from "./verify/verifier.js";

export class OAuthTokenVerifier implements McpTokenVerifier {
  constructor(private readonly verifier: Verifier) {}

  /** The token's `AuthInfo`: `clientId` is the agent's SPIFFE ID, `extra` the task, lease and actor. */
  async verifyAccessToken(token: string): Promise<AuthInfo> {
    try {
      const v = await this.verifier.verify(token);
      return {
        token,
        clientId: v.agent,
        scopes: v.scopes,
        expiresAt: v.expiresAt,
        resource: new URL(v.audience),
        extra: { taskId: v.taskId, leaseId: v.leaseId, actor: v.actor },
      };
    } catch (e) {
      if (e instanceof VerifyError) {
        throw e.serverSide ? new ServerError(e.check) : new InvalidTokenError(e.check);
      }
      throw e;
    }
  }
}
