#!/bin/sh
# mount hook: after the initqueue is finished. The agent has filled $NEWROOT (normally a tmpfs
# the partscript mounted); make sure it is a mount point so dracut switches root into it.
# Service mode and failures end in a shell on the console instead (no reboot loop).

type luna_shell > /dev/null 2>&1 || . /lib/luna-lib.sh

if [ "$root" = "luna" ] || [ "$netroot" = "luna" ]; then
    if [ -e /tmp/luna.service ]; then
        luna_shell "luna service mode" "service mode: no install. Exit the shell to reboot."
        reboot -f
    elif [ -e /tmp/luna.failed ]; then
        emergency_shell -n luna "$(cat /tmp/luna.failed)"
    elif [ ! -e /tmp/luna.done ]; then
        emergency_shell -n luna "luna: the agent never ran (no network interface came up?)"
    elif ! ismounted "$NEWROOT"; then
        # A partscript that filled $NEWROOT without mounting it: bind it onto itself.
        mount --bind "$NEWROOT" "$NEWROOT" || emergency_shell -n luna "luna: cannot make $NEWROOT a mount point"
    fi
fi
