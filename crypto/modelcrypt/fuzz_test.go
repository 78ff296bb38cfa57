package modelcrypt

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/rogpeppe/go-internal/txtar"
)

// Fuzz targets, one per parser: header object, manifest JSON, chunk decryption, and a whole
// shard stream. `make fuzz` runs each briefly; seeds come from the test vectors.

// vectorObjects returns every object of every test vector (seed corpus).
func vectorObjects(f *testing.F) []map[string][]byte {
	paths, _ := filepath.Glob(filepath.Join(vectorDir, "*.txtar"))
	var out []map[string][]byte
	for _, p := range paths {
		raw, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		objs := map[string][]byte{}
		for _, file := range txtar.Parse(raw).Files {
			b, err := base64.StdEncoding.DecodeString(strings.ReplaceAll(string(file.Data), "\n", ""))
			if err != nil {
				f.Fatal(err)
			}
			objs[file.Name] = b
		}
		out = append(out, objs)
	}
	if len(out) == 0 {
		f.Fatal("no test vectors")
	}
	return out
}

func FuzzParseHeader(f *testing.F) {
	for _, objs := range vectorObjects(f) {
		f.Add(objs[HeaderObject])
	}
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseHeader(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNotModel) && !errors.Is(err, ErrUnsupportedVersion) {
				t.Fatalf("unclassified error: %v", err)
			}
			return
		}
		// A parsed header re-validates, round-trips its hint, and never unlocks under a
		// key other than the vectors' (or reports it as wrong key / corrupt).
		if err := m.Manifest().validate(); err != nil {
			t.Fatalf("parsed manifest does not validate: %v", err)
		}
		h2, err := SetKeyHint(b, m.KeyHint())
		if err != nil || !bytes.Equal(h2, b) {
			t.Fatalf("SetKeyHint round trip: %v", err)
		}
		err = m.Unlock(testKey(1))
		if err != nil && !errors.Is(err, ErrWrongKey) && !errors.Is(err, ErrCorrupt) {
			t.Fatalf("unlock: unclassified error: %v", err)
		}
	})
}

func FuzzParseManifest(f *testing.F) {
	for _, objs := range vectorObjects(f) {
		if h, _, err := parseHeader(objs[HeaderObject]); err == nil {
			f.Add(h.manifest)
		}
	}
	f.Add([]byte(`{"chunk_size":64,"files":[],"kind":"files","shard_size":128}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseManifest(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("unclassified error: %v", err)
			}
			return
		}
		out, err := marshalManifest(m)
		if err != nil || !bytes.Equal(out, b) {
			t.Fatalf("accepted manifest does not round-trip: %v", err)
		}
	})
}

// fuzzModel is one unlocked model (the multi-shard vector) shared by the chunk fuzzers.
var fuzzModel = sync.OnceValues(func() (*Model, map[string][]byte) { return loadVectorModel("ok-multi-shard") })

// fuzzLoneModel is a model with one file of one shard of two chunks.
var fuzzLoneModel = sync.OnceValues(func() (*Model, map[string][]byte) { return loadVectorModel("ok-exact-shard") })

func loadVectorModel(name string) (*Model, map[string][]byte) {
	raw, err := os.ReadFile(filepath.Join(vectorDir, name+".txtar"))
	if err != nil {
		panic(err)
	}
	objs := map[string][]byte{}
	for _, file := range txtar.Parse(raw).Files {
		b, _ := base64.StdEncoding.DecodeString(strings.ReplaceAll(string(file.Data), "\n", ""))
		objs[file.Name] = b
	}
	m, err := ParseHeader(objs[HeaderObject])
	if err != nil {
		panic(err)
	}
	if err := m.Unlock(testKey(1)); err != nil {
		panic(err)
	}
	return m, objs
}

func FuzzDecryptChunk(f *testing.F) {
	m, objs := fuzzModel()
	for fi, mf := range m.man.Files {
		for j, s := range mf.Shards {
			obj := objs[s.Object]
			for i := range s.Chunks {
				off := m.ChunkOffset(i)
				end := min(off+int64(m.man.ChunkSize+tagSize), int64(len(obj)))
				f.Add(fi, j, i, obj[off:end])
			}
		}
	}
	f.Fuzz(func(t *testing.T, fi, j int, i int64, chunk []byte) {
		pt, err := m.DecryptChunk(nil, fi, j, i, chunk)
		if err != nil {
			return
		}
		// Success only for the genuine chunk at its genuine position.
		s := m.man.Files[fi].Shards[j]
		obj := objs[s.Object]
		off := m.ChunkOffset(i)
		end := min(off+int64(m.man.ChunkSize+tagSize), int64(len(obj)))
		if !bytes.Equal(chunk, obj[off:end]) || len(pt) != len(chunk)-tagSize {
			t.Fatalf("forged chunk accepted at file %d shard %d chunk %d", fi, j, i)
		}
	})
}

// FuzzShardStream feeds arbitrary bytes as a shard object: Decrypt must fail cleanly (never
// close the file) unless the bytes are the genuine object.
func FuzzShardStream(f *testing.F) {
	m, objs := fuzzModel()
	target := m.man.Files[0].Shards[1].Object
	f.Add(objs[target])
	f.Add(objs[m.man.Files[0].Shards[0].Object])
	f.Add(objs[target][:len(objs[target])-1])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		o := map[string][]byte{}
		for k, v := range objs {
			o[k] = v
		}
		o[target] = b
		sink := newMemSink()
		_, err := m.Decrypt(context.Background(), &memSource{objs: o}, sink,
			DecryptOptions{Skip: func(f ManifestFile) bool { return f.Path != "a.bin" }})
		if err == nil {
			if !bytes.Equal(b, objs[target]) {
				t.Fatal("forged shard accepted")
			}
			return
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("unclassified error: %v", err)
		}
		if len(sink.closedFiles()) != 0 {
			t.Fatal("a file was closed after a failure")
		}
	})
}

// FuzzLoneShard is FuzzShardStream for a lone single-shard file, whose chunks Decrypt
// spreads over several goroutines (decryptShardParallel).
func FuzzLoneShard(f *testing.F) {
	m, objs := fuzzLoneModel()
	target := m.man.Files[0].Shards[0].Object
	f.Add(objs[target], uint8(2))
	f.Add(objs[target][:len(objs[target])-1], uint8(3))
	f.Add(append(bytes.Clone(objs[target]), 0), uint8(2))
	f.Fuzz(func(t *testing.T, b []byte, workers uint8) {
		w := int(workers%4) + 2
		if !pipelineFile(w, m.man.Files[0].Size, m.man.Files[0].Size) {
			t.Fatal("the parallel path is not taken")
		}
		sink := newMemSink()
		_, err := m.Decrypt(context.Background(), &memSource{objs: map[string][]byte{target: b}}, sink,
			DecryptOptions{Workers: w})
		if err == nil {
			if !bytes.Equal(b, objs[target]) {
				t.Fatal("forged shard accepted")
			}
			return
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("unclassified error: %v", err)
		}
		if len(sink.closedFiles()) != 0 {
			t.Fatal("a file was closed after a failure")
		}
	})
}
