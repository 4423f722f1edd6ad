# Shared by the .ci checks (sourced). copy_clone ROOT DEST: the clone's tracked files plus untracked, non-ignored ones
# (a developer's uncommitted work) into DEST; never build outputs or venvs, so a build there leaves the clone clean.
copy_clone() {
  mkdir -p "$2"
  git -C "$1" ls-files -z --cached --others --exclude-standard |
    (cd "$1" && xargs -0 -r sh -c 'for f; do if [ -f "$f" ]; then printf "%s\0" "$f"; fi; done' sh) |
    tar -C "$1" --null -T - -cf - | tar -C "$2" -xf -
}
