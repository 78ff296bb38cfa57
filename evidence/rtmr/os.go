package rtmr

import (
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// OS is the real kernel: os.OpenFile for sysfs attributes, ioctl(2) on a device.
var OS Kernel = osKernel{}

type osKernel struct{}

func (osKernel) OpenFile(name string, flag int) (File, error) {
	f, err := os.OpenFile(name, flag, 0)
	if err != nil {
		return nil, err
	}
	return f, nil
}

func (osKernel) OpenDevice(name string) (Device, error) {
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return osDevice{f}, nil
}

type osDevice struct{ f *os.File }

func (d osDevice) Close() error { return d.f.Close() }

func (d osDevice) Ioctl(req uint, arg []byte) error {
	if len(arg) == 0 {
		return unix.EINVAL
	}
	rc, err := d.f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	if err := rc.Control(func(fd uintptr) {
		// EINTR comes from the driver's interruptible lock, taken before the TDCALL: nothing
		// happened, so the request is repeated (Go's runtime signals interrupt syscalls).
		for {
			_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(req), uintptr(unsafe.Pointer(&arg[0])))
			if errno != unix.EINTR {
				break
			}
		}
	}); err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}
