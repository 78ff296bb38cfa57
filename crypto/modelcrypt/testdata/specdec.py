#!/usr/bin/env python3
# An independent decryptor written from SPEC.md alone (Python + pyca/cryptography), used by
# TestVectorsIndependent to cross-check testdata/vectors: usage specdec.py VECTOR.txtar...
# Prints PASS/FAIL per vector; exits 1 if any vector's outcome differs from its "expect".
import base64, hashlib, hmac, json, struct, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

def hkdf_extract(salt, ikm): return hmac.new(salt, ikm, hashlib.sha256).digest()
def hkdf_expand(prk, info, L=32):
    out, t, i = b"", b"", 1
    while len(out) < L:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest(); out += t; i += 1
    return out[:L]

def load(path):
    txt = open(path).read()
    comment, *rest = txt.split("\n-- ")
    objs = {}
    for sec in rest:
        name, data = sec.split(" --\n", 1)
        objs[name] = base64.b64decode(data.replace("\n", ""))
    fields = dict(l.split(": ", 1) for l in comment.splitlines() if ": " in l)
    return fields, objs

def run(path):
    fields, objs = load(path)
    key = bytes.fromhex(fields["key"])
    h = objs["model.cai"]
    if h[:8] != b"CAIMODEL": return "not-model"
    ver, res, M = struct.unpack(">HHI", h[8:16])
    if ver != 1: return "unsupported-version"
    salt, commit, tag, csum = h[16:48], h[48:80], h[80:112], h[112:144]
    man = h[144:144+M]
    assert hashlib.sha256(h[:112] + man).digest() == csum
    H = struct.unpack(">H", h[144+M:146+M])[0]
    assert len(h) == 146 + M + H
    prk = hkdf_extract(salt, key)
    if not hmac.compare_digest(hkdf_expand(prk, b"cai-agent model v1 key commitment"), commit): return "wrong-key"
    km = hkdf_expand(prk, b"cai-agent model v1 manifest mac")
    if not hmac.compare_digest(hmac.new(km, h[:80] + man, hashlib.sha256).digest(), tag): return "corrupt(manifest)"
    m = json.loads(man)
    C = m["chunk_size"]
    out = []
    for f in m["files"]:
        p = f["path"].encode()
        data = b""
        for j, s in enumerate(f["shards"]):
            desc = struct.pack(">I", len(p)) + p + struct.pack(">QIIIQQ", f["size"], C, j, len(f["shards"]), s["offset"], s["size"])
            k = hkdf_expand(prk, b"cai-agent model v1 shard key\x00" + desc)
            g = AESGCM(k)
            obj = objs.get(s["object"], None)
            if obj is None: return "corrupt(missing)"
            pos = 0
            for i in range(s["chunks"]):
                n = min(C, s["size"] - i*C) + 16
                ch = obj[pos:pos+n]
                if len(ch) != n: return "corrupt(truncated)"
                nonce = struct.pack(">Q", i) + b"\0\0\0" + bytes([1 if i == s["chunks"]-1 else 0])
                try: data += g.decrypt(nonce, ch, b"")
                except Exception: return "corrupt(auth)"
                pos += n
            if pos != len(obj): return "corrupt(trailing)"
        if fields.get("verify-digests") == "true" and hashlib.sha256(data).hexdigest() != f["sha256"]:
            return "corrupt(digest)"
        out.append("%s %d %s" % (hashlib.sha256(data).hexdigest(), len(data), f["path"]))
    return "ok " + ";".join(out)

failed = False
for p in sys.argv[1:]:
    name = p.rsplit("/", 1)[-1]
    fields, _ = load(p)
    want = fields["expect"]
    try: got = run(p)
    except AssertionError: got = "corrupt(header)"
    except Exception as e: got = "error " + repr(e)
    okfiles = [l.split(": ",1)[1] for l in open(p).read().split("\n-- ")[0].splitlines() if l.startswith("file: ") and want == "ok"]
    match = got.split("(")[0].split(" ")[0] == want and (want != "ok" or got == "ok " + ";".join(okfiles))
    print(("PASS" if match else "FAIL"), name, want, "|", got[:90])
    failed = failed or not match
sys.exit(1 if failed else 0)
