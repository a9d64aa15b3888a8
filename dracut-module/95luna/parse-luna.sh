#!/bin/sh
# cmdline hook: claim root=luna so dracut does not stop at "don't know how to handle root=".
# The network-legacy module brings the boot interface up and then runs /sbin/netroot, which
# calls our handler /sbin/lunaroot (netroot=luna) with the interface name.

[ -z "$root" ] && root=$(getarg root=)

if [ "$root" = "luna" ]; then
    rootok=1
    netroot=luna
    # The initqueue (udev settle, ifup, netroot) is finished when the agent is done.
    echo '[ -e /tmp/luna.done ]' > "$hookdir"/initqueue/finished/luna.sh
    info "luna: root=luna, waiting for the network to install the node"
fi
