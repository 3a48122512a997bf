//! File-mode helper shared by every writer of safetensors files (adapters, merged models,
//! optimizer moments).

use std::path::Path;

/// Give the file `path` the permissions a newly created file gets in its folder (0666 less the
/// process umask), as `File::create` does.
///
/// safetensors 0.8 (through `candle_core::safetensors::save`) writes into a `tempfile` and renames
/// it, and such files are created 0600: without this an adapter or optimizer file would be private
/// where every other file of a run follows the umask (issue 15, point 16). The mode is taken from
/// a probe file created and removed next to `path`, so no process-wide umask call is needed.
pub fn follow_umask(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let probe = path.with_file_name(format!(".{name}.mode-probe"));
        let created = std::fs::File::create(&probe).and_then(|f| f.metadata());
        // Best effort: the probe is empty and the mode read (or its error) is what matters.
        let _ = std::fs::remove_file(&probe);
        let mode = created?.permissions().mode() & 0o777;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
