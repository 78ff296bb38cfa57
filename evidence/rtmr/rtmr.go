// Package rtmr reads and extends TDX runtime measurement registers through the Linux kernel:
// the tsm-mr sysfs files (Linux ≥ 6.16) or, as a fallback, the /dev/tdx_guest ioctls of the
// Alibaba Cloud Linux / Anolis 5.10 kernels. The kernel is behind the small Kernel interface so
// tests use a fake that behaves like it (see rtmrtest).
package rtmr

import (
	"crypto/sha512"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// Size is the size of an RTMR and of an extension digest (SHA-384).
const Size = 48

var (
	// ErrNotSupported: neither the sysfs files nor the ioctl device can extend RTMRs here.
	// Open returns it when neither exists; Ioctl.Extend also wraps it when the device knows
	// no extension request (mainline Linux 6.2–6.15).
	ErrNotSupported = errors.New("RTMR extension is not supported by this kernel")
	// ErrExtend: the kernel refused or failed an extension.
	ErrExtend = errors.New("RTMR extension failed")
	// ErrRead: the current RTMR values could not be read.
	ErrRead = errors.New("reading RTMRs failed")
)

// SysfsDir is the tsm-mr measurements directory, relative to the filesystem root.
const SysfsDir = "sys/class/misc/tdx_guest/measurements"

// DefaultDevice is the TDX guest device, relative to the filesystem root.
const DefaultDevice = "dev/tdx_guest"

// ioctl request numbers (linux/tdx-guest.h; Anolis 5.10 and Intel DCAP for EXTEND_RTMR).
const (
	// IoctlGetReport0 is TDX_CMD_GET_REPORT0 = _IOWR('T', 1, struct tdx_report_req{u8 reportdata[64]; u8 tdreport[1024]}).
	IoctlGetReport0 = 0xc4405401
	// IoctlExtendRTMR is TDX_CMD_EXTEND_RTMR = _IOR('T', 3, struct tdx_extend_rtmr_req{u8 data[48]; u8 index}).
	IoctlExtendRTMR = 0x80315403
	// IoctlExtendRTMRv3 is the same request as Intel's "V3" driver numbers it: _IOW('T', 3, …).
	IoctlExtendRTMRv3 = 0x40315403
)

// Sizes of the ioctl argument structs.
const (
	extendReqSize = Size + 1
	reportReqSize = 64 + 1024
	// tdreportRTMROffset is where RTMR0 sits in a TDREPORT_STRUCT: REPORTMACSTRUCT (256) +
	// TEE_TCB_INFO (239) + reserved (17) = TDINFO at 512; TDINFO's ATTRIBUTES (8), XFAM (8),
	// MRTD, MRCONFIGID, MROWNER, MROWNERCONFIG (4×48) come before RTMR[4].
	tdreportRTMROffset = 64 + 512 + 8 + 8 + 4*48
)

// File is an open sysfs attribute.
type File interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Close() error
}

// Device is an open ioctl device. arg is the request's argument struct; the kernel reads
// and writes it in place.
type Device interface {
	Ioctl(req uint, arg []byte) error
	Close() error
}

// Kernel is the part of the kernel this package uses. OS is the real one.
type Kernel interface {
	// OpenFile opens a sysfs attribute (flag as for os.OpenFile). A missing file is an error
	// satisfying errors.Is(err, fs.ErrNotExist).
	OpenFile(name string, flag int) (File, error)
	// OpenDevice opens an ioctl device read-write; missing: fs.ErrNotExist.
	OpenDevice(name string) (Device, error)
}

// Registers reads and extends RTMRs.
type Registers interface {
	// Read returns the current value of RTMR index (0..3).
	Read(index int) ([Size]byte, error)
	// Extend extends RTMR index with digest: RTMR = SHA-384(RTMR ‖ digest).
	Extend(index int, digest [Size]byte) error
	// Interface names the kernel interface used, for logs and errors.
	Interface() string
}

// Open returns the Registers of the running TD: the tsm-mr sysfs files under
// root/SysfsDir when rtmr3:sha384 exists there, otherwise the ioctl device (device, or
// root/DefaultDevice when empty). ErrNotSupported when neither exists.
func Open(k Kernel, root, device string) (Registers, error) {
	if root == "" {
		root = "/"
	}
	if device == "" {
		device = filepath.Join(root, DefaultDevice)
	}
	s := &Sysfs{K: k, Dir: filepath.Join(root, SysfsDir)}
	f, err := k.OpenFile(s.path(3), os.O_RDONLY)
	if err == nil {
		f.Close()
		return s, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s: %w", ErrNotSupported, s.path(3), err)
	}
	d, err := k.OpenDevice(device)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: neither %s (Linux ≥ 6.16 tsm-mr) nor %s exists", ErrNotSupported, s.path(3), device)
		}
		return nil, fmt.Errorf("%w: %s: %w", ErrNotSupported, device, err)
	}
	d.Close()
	return &Ioctl{K: k, Path: device}, nil
}

// Sysfs uses the tsm-mr files Dir/rtmrN:sha384: a read returns the 48-byte value; one write
// of exactly 48 bytes at offset 0 extends (the kernel answers EINVAL to anything else).
type Sysfs struct {
	K   Kernel
	Dir string
}

func (s *Sysfs) path(i int) string { return filepath.Join(s.Dir, fmt.Sprintf("rtmr%d:sha384", i)) }

// Interface implements Registers.
func (s *Sysfs) Interface() string { return "tsm-mr sysfs " + s.Dir }

// Read implements Registers.
func (s *Sysfs) Read(i int) ([Size]byte, error) {
	var v [Size]byte
	if i < 0 || i > 3 {
		return v, fmt.Errorf("%w: no RTMR%d", ErrRead, i)
	}
	f, err := s.K.OpenFile(s.path(i), os.O_RDONLY)
	if err != nil {
		return v, fmt.Errorf("%w: %w", ErrRead, err)
	}
	defer f.Close()
	n, err := f.ReadAt(v[:], 0)
	if n != Size {
		return v, fmt.Errorf("%w: %s: read %d of %d bytes: %v", ErrRead, s.path(i), n, Size, err)
	}
	return v, nil
}

// Extend implements Registers.
func (s *Sysfs) Extend(i int, digest [Size]byte) error {
	if i < 0 || i > 3 {
		return fmt.Errorf("%w: no RTMR%d", ErrExtend, i)
	}
	f, err := s.K.OpenFile(s.path(i), os.O_WRONLY)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrExtend, err)
	}
	n, err := f.WriteAt(digest[:], 0)
	cerr := f.Close()
	if err != nil {
		return fmt.Errorf("%w: write %s: %w", ErrExtend, s.path(i), err)
	}
	if n != Size {
		return fmt.Errorf("%w: write %s: %d of %d bytes written", ErrExtend, s.path(i), n, Size)
	}
	if cerr != nil {
		return fmt.Errorf("%w: close %s: %w", ErrExtend, s.path(i), cerr)
	}
	return nil
}

// Ioctl uses /dev/tdx_guest: TDX_CMD_EXTEND_RTMR (0x80315403, then 0x40315403 when the
// kernel answers ENOTTY) to extend — the kernel refuses RTMR0/1 with EPERM — and
// TDX_CMD_GET_REPORT0 to read the RTMRs from a fresh TDREPORT.
type Ioctl struct {
	K    Kernel
	Path string
}

// Interface implements Registers.
func (d *Ioctl) Interface() string { return "ioctl " + d.Path }

// Read implements Registers.
func (d *Ioctl) Read(i int) ([Size]byte, error) {
	var v [Size]byte
	if i < 0 || i > 3 {
		return v, fmt.Errorf("%w: no RTMR%d", ErrRead, i)
	}
	dev, err := d.K.OpenDevice(d.Path)
	if err != nil {
		return v, fmt.Errorf("%w: %w", ErrRead, err)
	}
	defer dev.Close()
	arg := make([]byte, reportReqSize)
	if err := dev.Ioctl(IoctlGetReport0, arg); err != nil {
		return v, fmt.Errorf("%w: TDX_CMD_GET_REPORT0 on %s: %w", ErrRead, d.Path, err)
	}
	off := tdreportRTMROffset + i*Size
	copy(v[:], arg[off:off+Size])
	return v, nil
}

// Extend implements Registers.
func (d *Ioctl) Extend(i int, digest [Size]byte) error {
	if i < 0 || i > 3 || i > 255 {
		return fmt.Errorf("%w: no RTMR%d", ErrExtend, i)
	}
	dev, err := d.K.OpenDevice(d.Path)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrExtend, err)
	}
	defer dev.Close()
	arg := make([]byte, extendReqSize)
	copy(arg, digest[:])
	arg[Size] = byte(i)
	err = dev.Ioctl(IoctlExtendRTMR, arg)
	if errors.Is(err, syscall.ENOTTY) {
		err = dev.Ioctl(IoctlExtendRTMRv3, arg)
	}
	if errors.Is(err, syscall.ENOTTY) {
		// Neither numbering: a device without the extension ioctl (mainline Linux 6.2–6.15
		// has TDX_CMD_GET_REPORT0 only).
		return fmt.Errorf("%w: %w: %s has no TDX_CMD_EXTEND_RTMR (mainline Linux extends RTMRs only through tsm-mr sysfs, from 6.16): %w",
			ErrExtend, ErrNotSupported, d.Path, err)
	}
	if err != nil {
		return fmt.Errorf("%w: TDX_CMD_EXTEND_RTMR(RTMR%d) on %s: %w", ErrExtend, i, d.Path, err)
	}
	return nil
}

// ExtendValue returns SHA-384(old ‖ digest), the value an RTMR takes after an extension.
func ExtendValue(old, digest [Size]byte) [Size]byte {
	h := sha512.New384()
	h.Write(old[:])
	h.Write(digest[:])
	var v [Size]byte
	h.Sum(v[:0])
	return v
}
