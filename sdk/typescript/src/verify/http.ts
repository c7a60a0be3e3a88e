/** A bounded HTTPS GET that trusts a given CA (Node's fetch cannot take one without undici). */
import { get } from "node:https";

export interface Fetched {
  status: number;
  contentType: string;
  body: Buffer;
}

/** GET `url`, trusting `ca` (PEM) if given, refusing bodies over `maxBytes` and answers not whole within `timeoutMs`. */
export function httpsGet(
  url: string,
  opts: { ca?: string | undefined; accept: string; maxBytes: number; timeoutMs: number },
): Promise<Fetched> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    if (u.protocol !== "https:") {
      reject(new Error(`${url} is not https://`));
      return;
    }
    const req = get(
      u,
      { ca: opts.ca, headers: { accept: opts.accept }, timeout: opts.timeoutMs },
      (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on("data", (chunk: Buffer) => {
          size += chunk.length;
          if (size > opts.maxBytes) {
            req.destroy(new Error(`${url}: larger than ${opts.maxBytes} bytes`));
            return;
          }
          chunks.push(chunk);
        });
        res.on("end", () =>
          resolve({
            status: res.statusCode ?? 0,
            contentType: String(res.headers["content-type"] ?? ""),
            body: Buffer.concat(chunks),
          }),
        );
        res.on("error", reject);
      },
    );
    // The whole answer within the time, not only each read: a server that
    // sends a byte at a time cannot hold a check up.
    const deadline = setTimeout(
      () => req.destroy(new Error(`${url}: no whole answer in ${opts.timeoutMs} ms`)),
      opts.timeoutMs,
    );
    deadline.unref();
    req.on("close", () => clearTimeout(deadline));
    req.on("timeout", () => req.destroy(new Error(`${url}: no answer in ${opts.timeoutMs} ms`)));
    req.on("error", reject);
  });
}
