package rtmr_test

import (
	"crypto/sha512"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence/rtmr"
	"github.com/cai-agent/cai-agent/evidence/rtmr/rtmrtest"
)

func digest(s string) [rtmr.Size]byte { return sha512.Sum384([]byte(s)) }

func TestExtendValue(t *testing.T) {
	d := digest("x")
	want := sha512.Sum384(append(make([]byte, 48), d[:]...))
	assert.Equal(t, want, rtmr.ExtendValue([48]byte{}, d))
}

func TestOpenSelectsInterface(t *testing.T) {
	root := t.TempDir()
	_, err := rtmr.Open(&rtmrtest.Kernel{Root: root}, root, "")
	require.ErrorIs(t, err, rtmr.ErrNotSupported)

	r, err := rtmr.Open(&rtmrtest.Kernel{Root: root, Sysfs: true, Ioctl: true}, root, "")
	require.NoError(t, err)
	assert.IsType(t, &rtmr.Sysfs{}, r)
	assert.Equal(t, filepath.Join(root, "sys/class/misc/tdx_guest/measurements"), r.(*rtmr.Sysfs).Dir)

	r, err = rtmr.Open(&rtmrtest.Kernel{Root: root, Ioctl: true}, root, "")
	require.NoError(t, err)
	assert.IsType(t, &rtmr.Ioctl{}, r)
	assert.Equal(t, filepath.Join(root, "dev/tdx_guest"), r.(*rtmr.Ioctl).Path)

	dev := filepath.Join(t.TempDir(), "tdx")
	r, err = rtmr.Open(&rtmrtest.Kernel{Root: root, Ioctl: true, Device: dev}, root, dev)
	require.NoError(t, err)
	assert.Equal(t, dev, r.(*rtmr.Ioctl).Path)
}

func TestSysfs(t *testing.T) {
	root := t.TempDir()
	k := &rtmrtest.Kernel{Root: root, Sysfs: true}
	r, err := rtmr.Open(k, root, "")
	require.NoError(t, err)
	var want [48]byte
	for _, s := range []string{"a", "b"} {
		require.NoError(t, r.Extend(3, digest(s)))
		want = rtmr.ExtendValue(want, digest(s))
		got, err := r.Read(3)
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
	// tsm-mr allows extending any RTMR.
	require.NoError(t, r.Extend(2, digest("c")))
	assert.Equal(t, rtmr.ExtendValue([48]byte{}, digest("c")), k.RTMR(2))
	_, err = r.Read(4)
	require.ErrorIs(t, err, rtmr.ErrRead)
	require.ErrorIs(t, r.Extend(-1, digest("")), rtmr.ErrExtend)

	// Kernel failures surface with their errno.
	k.BeforeExtend = func(int) error { return syscall.EIO }
	err = r.Extend(3, digest("d"))
	require.ErrorIs(t, err, rtmr.ErrExtend)
	require.ErrorIs(t, err, syscall.EIO)
}

// The fake follows sysfs_kf_bin_write (fs/sysfs/file.c), which clamps a write to the
// attribute's 48 bytes and answers EFBIG at or past its end, then tm_digest_write
// (drivers/virt/coco/guest/tsm-mr.c): one 48-byte write at offset 0, else EINVAL. Like
// os.File.WriteAt, a longer write goes on after the clamped part and fails there — after the
// RTMR was extended.
func TestFakeSysfsKernelRules(t *testing.T) {
	root := t.TempDir()
	k := &rtmrtest.Kernel{Root: root, Sysfs: true}
	f, err := k.OpenFile(filepath.Join(root, rtmr.SysfsDir, "rtmr3:sha384"), os.O_WRONLY)
	require.NoError(t, err)
	_, err = f.WriteAt(make([]byte, 47), 0)
	require.ErrorIs(t, err, syscall.EINVAL)
	_, err = f.WriteAt(make([]byte, 48), 1)
	require.ErrorIs(t, err, syscall.EINVAL)
	_, err = f.WriteAt(make([]byte, 1), 48)
	require.ErrorIs(t, err, syscall.EFBIG)
	assert.Equal(t, 0, k.Extends())
	n, err := f.WriteAt(make([]byte, 48), 0)
	require.NoError(t, err)
	assert.Equal(t, 48, n)
	assert.Equal(t, 1, k.Extends())
	// 49 bytes: the first 48 extend, the 49th is past the end.
	d := digest("long")
	before := k.RTMR(3)
	n, err = f.WriteAt(append(d[:], 0), 0)
	require.ErrorIs(t, err, syscall.EFBIG)
	assert.Equal(t, 48, n)
	assert.Equal(t, 2, k.Extends())
	assert.Equal(t, rtmr.ExtendValue(before, d), k.RTMR(3))
	_, err = k.OpenFile(filepath.Join(root, rtmr.SysfsDir, "rtmr4:sha384"), os.O_RDONLY)
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestIoctl(t *testing.T) {
	for _, v3 := range []bool{false, true} {
		root := t.TempDir()
		k := &rtmrtest.Kernel{Root: root, Ioctl: true, V3Only: v3}
		r, err := rtmr.Open(k, root, "")
		require.NoError(t, err)
		require.NoError(t, r.Extend(3, digest("a")))
		require.NoError(t, r.Extend(2, digest("b")))
		got, err := r.Read(3)
		require.NoError(t, err)
		assert.Equal(t, rtmr.ExtendValue([48]byte{}, digest("a")), got)
		got, err = r.Read(2)
		require.NoError(t, err)
		assert.Equal(t, rtmr.ExtendValue([48]byte{}, digest("b")), got)
		got, err = r.Read(0)
		require.NoError(t, err)
		assert.Equal(t, [48]byte{}, got)

		// The kernel refuses RTMR0/1 with EPERM.
		err = r.Extend(1, digest("c"))
		require.ErrorIs(t, err, rtmr.ErrExtend)
		require.ErrorIs(t, err, syscall.EPERM)
	}
}

// The real OS kernel interface: ioctl(2) on a device that does not know the requests gets
// ENOTTY for both EXTEND_RTMR numbers and for GET_REPORT0.
func TestOSIoctlENOTTY(t *testing.T) {
	if _, err := os.Stat("/dev/null"); err != nil {
		t.Skip("no /dev/null")
	}
	r := &rtmr.Ioctl{K: rtmr.OS, Path: "/dev/null"}
	err := r.Extend(3, digest("a"))
	require.ErrorIs(t, err, rtmr.ErrExtend)
	require.ErrorIs(t, err, syscall.ENOTTY)
	_, err = r.Read(3)
	require.ErrorIs(t, err, rtmr.ErrRead)
	require.ErrorIs(t, err, syscall.ENOTTY)

	// And sysfs through real files: missing files mean "not supported".
	root := t.TempDir()
	_, err = rtmr.Open(rtmr.OS, root, "")
	require.ErrorIs(t, err, rtmr.ErrNotSupported)
	// A regular file stands in for the attribute: reads and the 48-byte write go through.
	dir := filepath.Join(root, rtmr.SysfsDir)
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "rtmr3:sha384"), make([]byte, 48), 0o600))
	s, err := rtmr.Open(rtmr.OS, root, "")
	require.NoError(t, err)
	require.NoError(t, s.Extend(3, digest("a")))
	got, err := s.Read(3)
	require.NoError(t, err)
	assert.Equal(t, digest("a"), got, "a regular file just stores the write")
}

// Mainline Linux 6.2–6.15 has /dev/tdx_guest with TDX_CMD_GET_REPORT0 only (tdx_guest_ioctl
// answers ENOTTY to anything else): RTMRs read, but cannot be extended — ErrNotSupported.
func TestIoctlWithoutExtend(t *testing.T) {
	root := t.TempDir()
	k := &rtmrtest.Kernel{Root: root, Ioctl: true, NoExtend: true}
	r, err := rtmr.Open(k, root, "")
	require.NoError(t, err)
	_, err = r.Read(3)
	require.NoError(t, err)
	err = r.Extend(3, digest("a"))
	require.ErrorIs(t, err, rtmr.ErrExtend)
	require.ErrorIs(t, err, rtmr.ErrNotSupported)
	require.ErrorIs(t, err, syscall.ENOTTY)
	assert.Equal(t, 0, k.Extends())

	// Other failures are not "not supported".
	k = &rtmrtest.Kernel{Root: root, Ioctl: true, BeforeExtend: func(int) error { return syscall.EIO }}
	r, err = rtmr.Open(k, root, "")
	require.NoError(t, err)
	err = r.Extend(3, digest("a"))
	require.ErrorIs(t, err, rtmr.ErrExtend)
	require.NotErrorIs(t, err, rtmr.ErrNotSupported)
}
