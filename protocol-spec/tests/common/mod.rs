//! Shared by the integration tests: an image to serve and a sink that checks what arrives.

#![allow(dead_code)]

use spindrift_protocol::receiver::PageSink;
use spindrift_protocol::sender::PageSource;

/// An image of 4 KiB pages to serve.
pub struct Image(pub Vec<u8>);

impl PageSource for Image {
    fn page_count(&self) -> u32 {
        (self.0.len() / 4096) as u32
    }
    fn page(&self, page: u32) -> &[u8] {
        &self.0[page as usize * 4096..(page as usize + 1) * 4096]
    }
}

/// Checks every stored page against the image.
pub struct Check<'a> {
    pub image: &'a [u8],
    pub stored: Vec<bool>,
    pub bad: usize,
}

impl PageSink for Check<'_> {
    fn store(&mut self, page: u32, data: &[u8]) {
        let p = page as usize;
        if data != &self.image[p * 4096..(p + 1) * 4096] {
            self.bad += 1;
        }
        self.stored[p] = true;
    }
    fn store_zero(&mut self, first_page: u32, count: u32) {
        for p in first_page as usize..(first_page + count) as usize {
            if self.image[p * 4096..(p + 1) * 4096].iter().any(|&b| b != 0) {
                self.bad += 1;
            }
            self.stored[p] = true;
        }
    }
}
