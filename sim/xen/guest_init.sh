#!/bin/sh
# /init of the real-Xen job's guests (dom0 and the domUs share one image recipe).
# Mounts the basics, loads the Xen device modules, starts Xen's daemons in dom0 (no systemd,
# no udev, no xencommons), then runs the job's Python driver for its role and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /run/xen /run/qubes /var/log/xen/console /var/log/qubes /var/lib/xen
role=domu
for arg in $(cat /proc/cmdline); do
    case "$arg" in role=*) role=${arg#role=} ;; esac
done
modprobe -a xen-evtchn xen-gntdev xen-gntalloc xen-privcmd || echo "QXJ WARN modprobe failed"
if [ "$role" = dom0 ]; then
    modprobe xenfs && mount -t xenfs xenfs /proc/xen
    /usr/lib/xen-4.17/bin/xenstored --pid-file /run/xenstored.pid
    /usr/lib/xen-4.17/bin/xen-init-dom0
    /usr/lib/xen-4.17/bin/xenconsoled --log=guest --log-dir=/var/log/xen/console
fi
ip link set lo up 2>/dev/null || busybox ip link set lo up
echo "QXJ BOOTED role=$role uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /
PYTHONPATH=/opt/qrexec-py python3 -u -m "qrexec.sim.xen.guest_$role"
echo "QXJ GUEST-EXIT role=$role rc=$?"
sync
echo o > /proc/sysrq-trigger
sleep 30
