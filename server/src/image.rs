//! Page sources the server serves: a memory image file (a Firecracker memory snapshot, guest memory
//! as one flat file) mapped read-only, and guest memory already in this process.

use std::fs::File;
use std::path::Path;

use spindrift_protocol::sender::PageSource;

use crate::config::{check_image_len, pages_for_len, ConfigError};

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

/// Guest memory already in this process, served page by page: e.g. a forked VMM child's
/// copy-on-write view of its parent's guest memory, which no one writes for the child's life.
#[derive(Debug, Clone, Copy)]
pub struct MemoryImage<'a> {
    bytes: &'a [u8],
    pages: u32,
}

impl<'a> MemoryImage<'a> {
    /// Serves `bytes`: a non-zero multiple of [`PAGE_SIZE`], at most 2^32 - 1 pages.
    pub fn new(bytes: &'a [u8]) -> Result<MemoryImage<'a>, ConfigError> {
        let len = bytes.len() as u64;
        let pages = pages_for_len(len).map_err(|why| ConfigError::MemoryLength { len, why })?;
        Ok(MemoryImage { bytes, pages })
    }

    /// The whole image.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

impl PageSource for MemoryImage<'_> {
    fn page_count(&self) -> u32 {
        self.pages
    }

    fn page(&self, page: u32) -> &[u8] {
        let start = page as usize * PAGE_SIZE;
        &self.bytes[start..start + PAGE_SIZE]
    }
}
