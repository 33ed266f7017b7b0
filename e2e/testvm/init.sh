#!/bin/sh
# /init of the tapsync e2e guest (busybox ash). Embedded by image.go; its hash
# is part of the image cache key, so editing it rebuilds the image.
#
# Contract with the Go side (guest.go), one line each on the serial console:
#   TAPSYNC-AGENT-START <n>                the agent is started for the <n>th time (1, 2, ...)
#   TAPSYNC-AGENT-EXIT <n> <status>        the <n>th agent exited with <status>
#   TAPSYNC-READY                          modules loaded, lo up, agent started
# and only with tapsync.selfconfig=1 on the kernel command line, where the
# guest configures NICs itself instead of leaving that to the agent:
#   TAPSYNC-NIC-UP <ifname> <mac> <ip>     new NIC has <ip>/24 and is up
#   TAPSYNC-NIC-ERROR <ifname> <mac> <ip>  configuring a new NIC failed
#   TAPSYNC-NIC-GONE <ifname> <mac>        an announced NIC disappeared
# where <ip> is 10.99.<5th MAC byte>.<6th MAC byte> in decimal (GuestIP).
#
# If this script exits the kernel panics, and panic=-1 plus QEMU's -no-reboot
# turn that into QEMU exiting, which the Go side reports at once.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

# Load order comes from the modules' own "depends" (computed at build time).
while read -r m; do
	[ -n "$m" ] || continue
	insmod "/lib/modules/$m.ko" || echo "TAPSYNC-ERROR insmod $m failed"
done </etc/tapsync-modules

ip link set lo up

# The agent serves its virtio-serial ports until it exits (the test-only
# Restart, or a crash); then it is started again, as a service manager
# would. The pause keeps a crash loop from flooding the console.
(
	n=0
	while :; do
		n=$((n + 1))
		echo "TAPSYNC-AGENT-START $n"
		/bin/tapsync-testagent
		echo "TAPSYNC-AGENT-EXIT $n $?"
		sleep 0.2
	done
) &

selfconfig=0
read -r cmdline </proc/cmdline
case " $cmdline " in
*" tapsync.selfconfig=1 "*) selfconfig=1 ;;
esac

echo TAPSYNC-READY

if [ "$selfconfig" != 1 ]; then
	# Nothing more to do, but /init must never exit.
	while :; do sleep 3600; done
fi

# Poll rather than rely on uevents: there is no udev/mdev here, and a short
# sleep keeps the loop cheap under TCG. "seen" holds words
# "ifname=mac@ifindex": the ifindex tells a NIC replaced between two polls
# (same name, same MAC) from the one it replaced.
seen=""
while :; do
	now=""
	for d in /sys/class/net/*; do
		i=${d##*/}
		[ "$i" = lo ] && continue
		read -r mac <"$d/address" 2>/dev/null || continue
		read -r idx <"$d/ifindex" 2>/dev/null || continue
		now="$now $i=$mac@$idx"
	done

	# Report removals first, so a name reused for a new MAC reads in order.
	for w in $seen; do
		case " $now " in
		*" $w "*) ;;
		*)
			rest=${w#*=}
			echo "TAPSYNC-NIC-GONE ${w%%=*} ${rest%@*}"
			;;
		esac
	done

	for w in $now; do
		case " $seen " in
		*" $w "*) continue ;;
		esac
		i=${w%%=*}
		mac=${w#*=}
		mac=${mac%@*}
		# The 5th and 6th bytes of aa:bb:cc:dd:ee:ff, as decimal octets.
		b5=${mac#*:*:*:*:}
		b5=${b5%%:*}
		b6=${mac##*:}
		ip=10.99.$((0x$b5)).$((0x$b6))
		if ip addr add "$ip/24" dev "$i" && ip link set "$i" up; then
			echo "TAPSYNC-NIC-UP $i $mac $ip"
		else
			echo "TAPSYNC-NIC-ERROR $i $mac $ip"
		fi
	done

	seen=$now
	sleep 0.2
done
