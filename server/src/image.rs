//! The memory image: a Firecracker memory snapshot (guest memory as one flat file), mapped read-only.

use std::fs::File;
use std::path::Path;

use spindrift_protocol::sender::PageSource;

use crate::config::{check_image_len, ConfigError};

/// Page size of the images served.
pub const PAGE_SIZE: usize = 4096;

/// A memory image file mapped read-only, served page by page.
pub struct MmapImage {
    map: memmap2::Mmap,
    pages: u32,
}

impl MmapImage {
    /// Maps the image at `path`; its length must be a non-zero multiple of [`PAGE_SIZE`].
    ///
    /// The file must not change while it is served: it is a frozen snapshot.
    pub fn open(path: &Path) -> Result<MmapImage, ConfigError> {
        let read_err = |source| ConfigError::Read { flag: "--image", path: path.display().to_string(), source };
        let file = File::open(path).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        let pages = check_image_len(path, len)?;
        // SAFETY: the mapping is read-only and private to this process; the snapshot file is frozen
        // (the contract of a memory server: nobody writes or truncates it while it is served), so the
        // bytes behind the returned slice do not change under us.
        let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(&file) }.map_err(read_err)?;
        Ok(MmapImage { map, pages })
    }

    /// The whole image.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

impl PageSource for MmapImage {
    fn page_count(&self) -> u32 {
        self.pages
    }

    fn page(&self, page: u32) -> &[u8] {
        let start = page as usize * PAGE_SIZE;
        &self.map[start..start + PAGE_SIZE]
    }
}
