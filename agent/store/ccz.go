package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"github.com/cai-agent/cai-agent/crypto/ccz"
)

// UnpackCCZ decrypts CCZoo / confidential-ai-loader input (see package ccz) with key into OUT,
// through the same tmpfs check, lock, staging and atomic publish as Unpack. The files are
// whole-file AES-GCM messages, so each is read and authenticated in memory (one at a time,
// bounded by cczOpts.MaxDataLen) before it is staged; nothing is renamed into place until
// every file was authenticated. Output names drop ".aes".
//
// The format has no manifest, so Result.ManifestSHA256 (and ModelSHA256) is the hex SHA-256
// of the JSON array of {"path","size","sha256"} of the plaintext files sorted by path (the
// Files list of the ready marker), and Kind is "ccz". Authentication failure is ccz.ErrAuth
// (wrong key or tampered: the format cannot tell them apart).
func UnpackCCZ(ctx context.Context, key []byte, in *ccz.Input, out string, opts Options, cczOpts ccz.Options) (*Result, error) {
	start := time.Now()
	res := &Result{Kind: "ccz"}
	for _, e := range in.Files {
		if err := checkRel(e.Name); err != nil {
			return nil, err
		}
	}
	dec, err := ccz.NewDecryptor(key, cczOpts)
	if err != nil {
		return nil, err
	}
	defer dec.Close()
	p, err := begin(out, opts)
	if err != nil {
		return nil, err
	}
	defer p.close()
	paths := make([]string, len(in.Files))
	for i, e := range in.Files {
		paths[i] = e.Name
	}
	if err := p.checkNoForeign(paths); err != nil {
		return nil, err
	}

	infos := make([]FileInfo, 0, len(in.Files))
	var staged []stagedFile
	kept := map[string]fileID{} // already published and identical: re-checked by publish
	for _, e := range in.Files {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		pt, err := dec.Decrypt(e)
		if err != nil {
			return nil, err
		}
		sum := sha256.Sum256(pt)
		infos = append(infos, FileInfo{Path: e.Name, Size: int64(len(pt)), SHA256: hex.EncodeToString(sum[:])})
		if opts.Progress != nil {
			opts.Progress(int64(len(pt)))
		}
		if id, ok := p.identical(e.Name, int64(len(pt)), sum); ok {
			kept[e.Name] = id
			res.Skipped++
			continue
		}
		if err := stageBytes(p, e.Name, pt); err != nil {
			return nil, fmt.Errorf("store: stage %s: %w", e.Name, err)
		}
		staged = append(staged, stagedFile{rel: e.Name, size: int64(len(pt)), sum: sum})
		res.Files++
		res.Bytes += int64(len(pt))
	}
	lb, err := json.Marshal(infos)
	if err != nil {
		return nil, err
	}
	ls := sha256.Sum256(lb)
	res.ManifestSHA256 = hex.EncodeToString(ls[:])
	res.ModelSHA256 = res.ManifestSHA256
	if len(staged) == 0 && p.readyMatches(res.Kind, res.ModelSHA256, infos) {
		res.AlreadyPublished = true
		res.Duration = time.Since(start)
		return res, nil
	}
	if opts.BeforePublish != nil {
		if err := opts.BeforePublish(ctx, res); err != nil {
			return nil, err
		}
	}
	ready := &Ready{Kind: res.Kind, ManifestSHA256: res.ManifestSHA256, ModelSHA256: res.ModelSHA256, Files: infos}
	if err := p.publish(staged, kept, ready); err != nil {
		return nil, err
	}
	res.Duration = time.Since(start)
	return res, nil
}

func stageBytes(p *publisher, rel string, b []byte) error {
	f, err := p.mkStaged(rel, 0)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
