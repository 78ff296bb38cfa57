// Package rtmrtest is a fake TDX guest kernel for tests: the tsm-mr sysfs files and the
// /dev/tdx_guest ioctls, with the kernel's rules (48-byte writes at offset 0 only, EINVAL
// otherwise, longer writes clamped to 48 bytes and EFBIG past them; EPERM for RTMR0/1 through
// the ioctl; ENOTTY for unknown requests) and SHA-384 extension. Hooks inject failures before
// or after an extension takes effect.
package rtmrtest

import (
	"crypto/sha512"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/cai-agent/cai-agent/evidence/rtmr"
)

// Kernel is a fake rtmr.Kernel. The zero value has neither interface; set Sysfs and/or
// Ioctl. It is safe for concurrent use.
type Kernel struct {
	// Root is the filesystem root the paths are under ("" = "/").
	Root string
	// Device is the ioctl device path ("" = Root/dev/tdx_guest).
	Device string
	// Sysfs makes Root/sys/class/misc/tdx_guest/measurements/rtmr{0..3}:sha384 exist.
	Sysfs bool
	// Ioctl makes the device exist (Anolis 5.10 ioctls).
	Ioctl bool
	// V3Only makes the device answer ENOTTY to 0x80315403, as Intel's "V3" driver numbering.
	V3Only bool
	// NoExtend makes the device answer ENOTTY to both extension requests, as mainline Linux
	// 6.2–6.15, whose /dev/tdx_guest has TDX_CMD_GET_REPORT0 only.
	NoExtend bool
	// BeforeExtend, when set, runs before an extension; an error fails it (RTMR unchanged).
	BeforeExtend func(index int) error
	// AfterExtend, when set, runs after an extension took effect; an error is returned to the
	// caller although the RTMR was extended (a crash or signal after the kernel acted).
	AfterExtend func(index int) error

	mu      sync.Mutex
	rtmr    [4][rtmr.Size]byte
	extends int
}

// RTMR returns the current value of RTMR i.
func (k *Kernel) RTMR(i int) [rtmr.Size]byte {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.rtmr[i]
}

// SetRTMR sets RTMR i (e.g. to simulate another writer).
func (k *Kernel) SetRTMR(i int, v [rtmr.Size]byte) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.rtmr[i] = v
}

// Extends returns how many extensions took effect.
func (k *Kernel) Extends() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.extends
}

func (k *Kernel) root() string {
	if k.Root == "" {
		return "/"
	}
	return k.Root
}

func (k *Kernel) device() string {
	if k.Device == "" {
		return filepath.Join(k.root(), rtmr.DefaultDevice)
	}
	return k.Device
}

func (k *Kernel) extend(i int, d []byte) error {
	if k.BeforeExtend != nil {
		if err := k.BeforeExtend(i); err != nil {
			return err
		}
	}
	k.mu.Lock()
	h := sha512.New384()
	h.Write(k.rtmr[i][:])
	h.Write(d)
	h.Sum(k.rtmr[i][:0])
	k.extends++
	k.mu.Unlock()
	if k.AfterExtend != nil {
		return k.AfterExtend(i)
	}
	return nil
}

// OpenFile implements rtmr.Kernel.
func (k *Kernel) OpenFile(name string, flag int) (rtmr.File, error) {
	if k.Sysfs {
		for i := 0; i < 4; i++ {
			if filepath.Clean(name) == filepath.Join(k.root(), rtmr.SysfsDir, fmt.Sprintf("rtmr%d:sha384", i)) {
				return &file{k: k, i: i, flag: flag}, nil
			}
		}
	}
	return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
}

// OpenDevice implements rtmr.Kernel.
func (k *Kernel) OpenDevice(name string) (rtmr.Device, error) {
	if !k.Ioctl || filepath.Clean(name) != filepath.Clean(k.device()) {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	return device{k}, nil
}

type file struct {
	k    *Kernel
	i    int
	flag int
}

func (f *file) ReadAt(p []byte, off int64) (int, error) {
	if f.flag&(os.O_WRONLY|os.O_RDWR) == os.O_WRONLY {
		return 0, syscall.EBADF
	}
	v := f.k.RTMR(f.i)
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= rtmr.Size {
		return 0, io.EOF
	}
	n := copy(p, v[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt is os.File.WriteAt on the attribute: sysfs_kf_bin_write answers EFBIG at or past
// its 48 bytes and clamps a write to them, then tm_digest_write takes exactly 48 bytes at
// offset 0 (otherwise EINVAL). A longer write at 0 thus extends with its first 48 bytes and
// fails on the rest, as os.File.WriteAt writes on after a short pwrite.
func (f *file) WriteAt(p []byte, off int64) (int, error) {
	if f.flag&(os.O_WRONLY|os.O_RDWR) == 0 {
		return 0, syscall.EBADF
	}
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= rtmr.Size {
		return 0, syscall.EFBIG
	}
	n := min(len(p), rtmr.Size-int(off))
	if off != 0 || n != rtmr.Size {
		return 0, syscall.EINVAL
	}
	if err := f.k.extend(f.i, p[:n]); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, syscall.EFBIG
	}
	return n, nil
}

func (f *file) Close() error { return nil }

type device struct{ k *Kernel }

func (d device) Close() error { return nil }

func (d device) Ioctl(req uint, arg []byte) error {
	switch req {
	case rtmr.IoctlExtendRTMR, rtmr.IoctlExtendRTMRv3:
		if d.k.NoExtend || req == rtmr.IoctlExtendRTMR && d.k.V3Only {
			return syscall.ENOTTY
		}
		if len(arg) != rtmr.Size+1 {
			return syscall.EFAULT
		}
		idx := int(arg[rtmr.Size])
		if idx < 2 {
			return syscall.EPERM
		}
		if idx > 3 {
			return syscall.EINVAL
		}
		return d.k.extend(idx, arg[:rtmr.Size])
	case rtmr.IoctlGetReport0:
		if len(arg) != 64+1024 {
			return syscall.EFAULT
		}
		rep := arg[64:]
		clear(rep)
		copy(rep[128:], arg[:64]) // REPORTMACSTRUCT.REPORTDATA
		d.k.mu.Lock()
		for i := 0; i < 4; i++ {
			copy(rep[512+8+8+4*48+i*rtmr.Size:], d.k.rtmr[i][:])
		}
		d.k.mu.Unlock()
		return nil
	}
	return syscall.ENOTTY
}
