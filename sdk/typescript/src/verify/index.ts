/** The service's side: `Verifier` and its middleware. Import as "@mayfly/sdk/verify". */
export { VerifyError } from "../errors.js";
export {
  check,
  expressMiddleware,
  type GuardOptions,
  honoMiddleware,
  isRefusal,
  type Refusal,
  verifyRequest,
  withToken,
} from "./middleware.js";
export {
  ALGORITHMS,
  certThumbprint,
  type DpopRequest,
  type FeedConfig,
  feedFromProfile,
  type StatusListOptions,
  type VerifiedToken,
  Verifier,
  type VerifierOptions,
} from "./verifier.js";
