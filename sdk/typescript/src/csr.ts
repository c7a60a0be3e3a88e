/**
 * A PKCS#10 request for a fresh P-256 key, as the broker wants it: only
 * the public key counts (the subject and SANs come from the task), so the
 * subject is empty and there are no attributes. The structures are
 * @peculiar/asn1-csr's; the key and the ECDSA signature (DER) are Node's.
 */
import { generateKeyPairSync, type KeyObject, sign } from "node:crypto";
import { Attributes, CertificationRequest, CertificationRequestInfo } from "@peculiar/asn1-csr";
import { AsnConvert } from "@peculiar/asn1-schema";
import { AlgorithmIdentifier, Name, SubjectPublicKeyInfo } from "@peculiar/asn1-x509";

const ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2";

export function newCsr(): { key: KeyObject; csr: Uint8Array } {
  const { publicKey, privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const spki = publicKey.export({ type: "spki", format: "der" });
  const info = new CertificationRequestInfo({
    version: 0,
    subject: new Name(),
    subjectPKInfo: AsnConvert.parse(spki, SubjectPublicKeyInfo),
    attributes: new Attributes(),
  });
  const tbs = Buffer.from(AsnConvert.serialize(info));
  const request = new CertificationRequest({
    certificationRequestInfo: info,
    signatureAlgorithm: new AlgorithmIdentifier({ algorithm: ECDSA_WITH_SHA256 }),
    signature: new Uint8Array(sign("sha256", tbs, privateKey)).buffer,
  });
  return { key: privateKey, csr: new Uint8Array(AsnConvert.serialize(request)) };
}
