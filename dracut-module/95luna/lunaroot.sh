#!/bin/sh
# netroot handler for root=luna: called by /sbin/netroot as "lunaroot NETIF luna NEWROOT" when
# an interface is up. Runs luna-agent once; the mount hook acts on the result.

command -v getarg > /dev/null || . /lib/dracut-lib.sh

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

# Several interfaces may come up: only the first runs the agent.
[ -e /tmp/luna.done ] && exit 0
mkdir /tmp/luna.lock 2> /dev/null || exit 0

if getargbool 0 luna.service; then
    luna-agent service || warn "luna: could not report service mode to the server"
    : > /tmp/luna.service
    : > /tmp/luna.done
    exit 0
fi

info "luna: installing the node (interface $1)"
if luna-agent install --sysroot "${3:-${NEWROOT:-/sysroot}}" > /dev/console 2>&1; then
    info "luna: install finished"
else
    echo "luna-agent install failed with status $?; see the messages above" > /tmp/luna.failed
fi
: > /tmp/luna.done
exit 0
