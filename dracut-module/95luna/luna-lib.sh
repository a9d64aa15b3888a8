#!/bin/sh
# Shared by the 95luna hooks.

# luna_shell NAME MESSAGE: an interactive shell on the console whose prompt says NAME.
luna_shell() {
    _luna_name="$1"
    shift
    echo
    echo "luna: $*"
    echo
    if [ -n "$DRACUT_SYSTEMD" ]; then
        # A hook's output goes to the journal under systemd: the banner goes to the console.
        printf '\nluna: %s\n\n' "$*" > /dev/console
        # The same way dracut's own emergency shell gets the console under systemd (sulogin:
        # Enter, then the shell with this prompt).
        : > /.console_lock
        echo "PS1=\"$_luna_name:\\\${PWD}# \"" > /etc/profile
        systemctl start dracut-emergency.service
        rm -f -- /etc/profile /.console_lock
    else
        _luna_ctty=/dev/console
        PS1="$_luna_name:\${PWD}# " setsid -c sh -i < "$_luna_ctty" > "$_luna_ctty" 2>&1 \
            || PS1="$_luna_name:\${PWD}# " sh -i < "$_luna_ctty" > "$_luna_ctty" 2>&1
    fi
}
