# Parse the subset of "#cloud-config" the plugin's seed emits (FAKE cloud-init, tiny test guest).
#
# Input: user-data.  Output (stdout): a plan, one tab-separated record per line:
#   hostname  NAME
#   user      NAME  SHELL
#   key       NAME  KEY
#   file      N     PATH  OWNER  PERMS  ENCODING  APPEND      (content in OUTDIR/file.N)
#   final     MESSAGE
# runcmd items become lines of OUTDIR/runcmd (a /bin/sh script), as real cloud-init writes them.
# Supported: top-level scalars hostname, fqdn (ignored), final_message; users (mappings with name,
# shell, ssh_authorized_keys as block or flow list; other keys ignored; the string "default" ignored);
# write_files (path, owner, permissions, encoding b64|base64|text, content as one-line scalar or
# "|" block, append); runcmd items as strings or lists (flow [a, "b"] or nested block "- - a").
# Unknown top-level keys are skipped with their nested lines.  Anything else: exit 2 with a message.
# Run with: awk -v OUTDIR=dir -f cloud-config.awk user-data

function fail(msg) {
    printf "user-data line %d: %s\n", NR, msg > "/dev/stderr"
    failed = 1
    exit 2
}

function indent_of(s,    m) {
    match(s, /^ */)
    return RLENGTH
}

function hexval(h,    v, k, d) {
    if (h !~ /^[0-9A-Fa-f]+$/) fail("bad hex escape")
    v = 0
    for (k = 1; k <= length(h); k++) v = v * 16 + index("0123456789abcdef", tolower(substr(h, k, 1))) - 1
    return v
}

# The UTF-8 bytes of code point `cp` (YAML \x, \u and \U escapes name code points).
function utf8(cp) {
    if (cp == 0) fail("NUL characters are not supported")
    if (cp < 128) return sprintf("%c", cp)
    if (cp < 2048) return sprintf("%c%c", 192 + int(cp / 64), 128 + cp % 64)
    if (cp < 65536) return sprintf("%c%c%c", 224 + int(cp / 4096), 128 + int(cp / 64) % 64, 128 + cp % 64)
    return sprintf("%c%c%c%c", 240 + int(cp / 262144), 128 + int(cp / 4096) % 64, 128 + int(cp / 64) % 64, 128 + cp % 64)
}

# Unquote one YAML scalar: 'single' (with ''), "double" (with \ escapes), or plain (trailing # comment cut).
function scalar(s,    out, i, c, n) {
    sub(/^[ \t]+/, "", s)
    if (substr(s, 1, 1) == "'") {
        out = ""
        for (i = 2; i <= length(s); i++) {
            c = substr(s, i, 1)
            if (c == "'") {
                if (substr(s, i + 1, 1) == "'") { out = out "'"; i++; continue }
                rest = substr(s, i + 1)
                return out
            }
            out = out c
        }
        fail("unterminated single-quoted string")
    }
    if (substr(s, 1, 1) == "\"") {
        out = ""
        for (i = 2; i <= length(s); i++) {
            c = substr(s, i, 1)
            if (c == "\\") {
                i++
                c = substr(s, i, 1)
                n = (c == "x") ? 2 : (c == "u") ? 4 : (c == "U") ? 8 : 0
                if (n) { out = out utf8(hexval(substr(s, i + 1, n))); i += n; continue }
                if (c == "n") c = "\n"
                else if (c == "t") c = "\t"
                else if (c == "r") c = "\r"
                else if (c == "a") c = sprintf("%c", 7)
                else if (c == "b") c = sprintf("%c", 8)
                else if (c == "e") c = sprintf("%c", 27)
                else if (c == "f") c = sprintf("%c", 12)
                else if (c == "v") c = sprintf("%c", 11)
                else if (c == "0") fail("NUL characters are not supported")
                else if (c != "\\" && c != "\"" && c != "/" && c != " ") fail("unsupported escape \\" c)
                out = out c
                continue
            }
            if (c == "\"") { rest = substr(s, i + 1); return out }
            out = out c
        }
        fail("unterminated double-quoted string")
    }
    sub(/[ \t]+#.*$/, "", s)
    sub(/[ \t]+$/, "", s)
    rest = ""
    return s
}

# Split a one-line flow sequence "[a, 'b', "c"]" into FLOW[1..n]; returns n.
function flow(s,    n, c, item) {
    sub(/^[ \t]*\[/, "", s)
    n = 0
    delete FLOW
    while (1) {
        sub(/^[ \t]+/, "", s)
        if (s == "") fail("flow sequence must close on the same line")
        c = substr(s, 1, 1)
        if (c == "]") return n
        if (c == "'" || c == "\"") {
            item = scalar(s)
            s = rest
        } else {
            match(s, /^[^],]*/)
            item = substr(s, 1, RLENGTH)
            s = substr(s, RLENGTH + 1)
            sub(/[ \t]+$/, "", item)
        }
        FLOW[++n] = item
        sub(/^[ \t]+/, "", s)
        c = substr(s, 1, 1)
        if (c == ",") s = substr(s, 2)
        else if (c != "]") fail("bad flow sequence")
    }
}

function sq(s) {
    gsub(/'/, "'\\''", s)
    return "'" s "'"
}

function clean(s) {
    if (s ~ /[\t\n]/) fail("tab or newline in a value that cannot hold one")
    return s
}

function flush_file() {
    if (f_path == "") {
        if (f_active) fail("write_files entry without path")
        return
    }
    nfiles++
    printf "%s", f_content > (OUTDIR "/file." nfiles)
    close(OUTDIR "/file." nfiles)
    printf "file\t%d\t%s\t%s\t%s\t%s\t%s\n", nfiles, clean(f_path), clean(f_owner), clean(f_perms), clean(f_enc), f_append
    f_path = ""; f_active = 0
}

function flush_user() {
    if (u_active && u_name == "") fail("users entry without name")
    if (u_name != "") {
        printf "user\t%s\t%s\n", clean(u_name), clean(u_shell)
        for (k = 1; k <= u_nkeys; k++) printf "key\t%s\t%s\n", u_name, clean(u_keys[k])
    }
    u_name = ""; u_shell = ""; u_nkeys = 0; u_active = 0
}

function flush_run(    k, line) {
    if (r_n > 0) {
        line = ""
        for (k = 1; k <= r_n; k++) line = line (k > 1 ? " " : "") sq(r_args[k])
        print line > (OUTDIR "/runcmd")
    }
    r_n = 0; r_active = 0
}

function end_item() {
    if (section == "write_files") flush_file()
    else if (section == "users") flush_user()
    else if (section == "runcmd") flush_run()
}

# One "key: value" inside a users / write_files mapping item.
function item_pair(key, val, ind) {
    if (section == "users") {
        if (key == "name") u_name = scalar(val)
        else if (key == "shell") u_shell = scalar(val)
        else if (key == "ssh_authorized_keys") {
            if (val ~ /^[ \t]*\[/) { n = flow(val); for (k = 1; k <= n; k++) u_keys[++u_nkeys] = FLOW[k] }
            else { sub_list = "keys"; sub_indent = -1 }
        }
        return
    }
    if (key == "path") f_path = scalar(val)
    else if (key == "owner") f_owner = scalar(val)
    else if (key == "permissions") f_perms = scalar(val)
    else if (key == "encoding") f_enc = scalar(val)
    else if (key == "append") f_append = (scalar(val) ~ /^(true|True|yes)$/) ? "1" : "0"
    else if (key == "content") {
        if (val ~ /^[ \t]*[|>]-?[ \t]*$/) { block = 1; block_indent = -1; block_chomp = (val ~ /-/); f_content = "" }
        else f_content = scalar(val)
    }
}

function start_item() {
    end_item()
    if (section == "write_files") {
        f_active = 1; f_path = ""; f_owner = "root:root"; f_perms = "0644"; f_enc = "text"; f_content = ""; f_append = "0"
    } else if (section == "users") {
        u_active = 1
    } else if (section == "runcmd") {
        r_active = 1; r_n = 0
    }
}

BEGIN { section = ""; nfiles = 0; sub_list = "" }

NR == 1 {
    sub(/\r$/, "")
    if ($0 !~ /^#cloud-config[ \t]*$/) fail("user-data must start with #cloud-config")
    next
}

{
    sub(/\r$/, "")
    line = $0
    ind = indent_of(line)
    body = substr(line, ind + 1)

    # Inside a "content: |" block: take every line indented deeper than the key (blank lines too).
    if (block) {
        if (body == "" || (block_indent < 0 && ind > item_indent) || (block_indent >= 0 && ind >= block_indent)) {
            if (body != "" && block_indent < 0) block_indent = ind
            f_content = f_content (body == "" ? "" : substr(line, block_indent + 1)) "\n"
            next
        }
        block = 0
        if (block_chomp) sub(/\n+$/, "", f_content)
    }

    if (body == "" || body ~ /^#/) next

    if (ind == 0 && body ~ /^-( |$)/ && section == "skip") next
    if (ind == 0 && !(body ~ /^-( |$)/ && (section == "users" || section == "write_files" || section == "runcmd"))) {
        end_item()
        sub_list = ""
        if (body ~ /^- /) fail("a top-level sequence is not cloud-config")
        if (!match(body, /^[A-Za-z_][A-Za-z0-9_-]*:/)) fail("expected a top-level key")
        key = substr(body, 1, RLENGTH - 1)
        val = substr(body, RLENGTH + 1)
        section = ""
        if (key == "hostname") { printf "hostname\t%s\n", clean(scalar(val)) }
        else if (key == "final_message") { printf "final\t%s\n", clean(scalar(val)) }
        else if (key == "users" || key == "write_files" || key == "runcmd") {
            section = key
            item_indent = -1
            if (val !~ /^[ \t]*$/ && val !~ /^[ \t]*\[\][ \t]*$/) fail(key " must be a block sequence")
        } else { section = "skip" }
        next
    }

    if (section == "skip" || section == "") next

    # A new item of the section's sequence.
    if (body ~ /^-( |$)/ && (item_indent < 0 || ind == item_indent)) {
        item_indent = ind
        start_item()
        sub_list = ""
        rest_item = substr(body, 2)
        sub(/^[ \t]+/, "", rest_item)
        if (section == "runcmd") {
            if (rest_item ~ /^\[/) { n = flow(rest_item); for (k = 1; k <= n; k++) r_args[++r_n] = FLOW[k]; runlist = 1 }
            else if (rest_item ~ /^- /) {          # nested block list "- - sh"
                r_args[++r_n] = scalar(substr(rest_item, 3)); runlist = 1; sub_list = "run"; sub_indent = ind + 2
            } else {                                # a string: a line of the script as is
                print scalar(rest_item) > (OUTDIR "/runcmd"); r_active = 0
            }
            next
        }
        if (section == "users" && rest_item !~ /:/) { u_active = 0; next }  # "- default"
        if (!match(rest_item, /^[A-Za-z_][A-Za-z0-9_-]*:/)) fail(section " items must be mappings")
        item_pair(substr(rest_item, 1, RLENGTH - 1), substr(rest_item, RLENGTH + 1), ind)
        next
    }

    if (item_indent < 0) fail("expected a sequence item")

    # Lines of a nested list: ssh_authorized_keys entries or the rest of a "- - sh" command.
    if (body ~ /^- / && sub_list != "") {
        if (sub_indent < 0) sub_indent = ind
        v = scalar(substr(body, 3))
        if (sub_list == "keys") u_keys[++u_nkeys] = v
        else r_args[++r_n] = v
        next
    }
    if (body ~ /^-$/) fail("empty sequence item")

    # Further "key: value" of the current mapping item.
    if (section != "runcmd" && match(body, /^[A-Za-z_][A-Za-z0-9_-]*:/)) {
        sub_list = ""
        item_pair(substr(body, 1, RLENGTH - 1), substr(body, RLENGTH + 1), ind)
        next
    }
    fail("unsupported line in " section)
}

END {
    if (failed) exit 2
    if (block && block_chomp) sub(/\n+$/, "", f_content)
    end_item()
}
