//! Byte streams between a blocking worker and the channel, under the host's credit: small
//! bounded queues, and the channel's end with the worker's result.

use std::io::{Read, Write};

use moat_proto::{ExitStatus, Message, Stream, INITIAL_WINDOW};
use tokio::sync::mpsc;

use super::{Consumer, Producer};
use crate::channel::{Credit, Ctl, Outbox};

/// Chunks queued between the blocking worker and the channel.
const QUEUE: usize = 4;

/// Bytes per chunk, and so per data frame, of a file stream: each chunk costs the guest the same
/// few wake-ups and system calls whatever its size. A quarter of the credit window, so four are
/// in flight; far below the frame limit.
pub(super) const FILE_CHUNK: usize = INITIAL_WINDOW as usize / 4;

/// A `Write` that gathers bytes into whole chunks and hands each to the channel task; blocks
/// while the queue is full. Each byte is copied once here (tar and io::copy write in 512-byte and
/// 8 KiB pieces, and every frame costs the emulated guest the same however small it is).
pub(super) struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    chunk: Vec<u8>,
}

impl ChunkWriter {
    fn new(tx: mpsc::Sender<Vec<u8>>) -> ChunkWriter {
        ChunkWriter { tx, chunk: Vec::with_capacity(FILE_CHUNK) }
    }

    fn send(&mut self) -> std::io::Result<()> {
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(FILE_CHUNK));
        self.tx.blocking_send(chunk).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    /// Send all of `r`, read straight into the chunks: no copy through `write`, and no zeroing
    /// of the chunk first (`read_to_end` reads into its spare room).
    pub(super) fn send_from(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        self.flush()?;
        loop {
            if r.take(FILE_CHUNK as u64).read_to_end(&mut self.chunk)? == 0 {
                return Ok(());
            }
            self.send()?;
        }
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(FILE_CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() == FILE_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    /// Sends what is gathered; fails once the host stopped listening, so a worker with nothing
    /// to write can notice.
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.chunk.is_empty() {
            self.send()?;
        }
        if self.tx.is_closed() {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(())
    }
}

/// A `Read` over chunks the channel task hands over; EOF when the host's stdin ends.
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.pending.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => (self.pending, self.at) = (chunk, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// End the channel: exit code 0, or 1 with the reason on stderr.
async fn finish(id: u32, out: &Outbox, result: Result<(), String>) {
    let code = match result {
        Ok(()) => 0,
        Err(message) => {
            out.send(id, Message::Data { stream: Stream::Stderr, data: message.into_bytes() }).await;
            1
        }
    };
    out.send(id, Message::Eof { stream: Stream::Stdout }).await;
    out.send(id, Message::Eof { stream: Stream::Stderr }).await;
    out.send(id, Message::Exit(ExitStatus { code: Some(code), signal: None, timed_out: false })).await;
    out.send(id, Message::Close).await;
}

/// Send what `work` writes as stdout, never more than the host's credit ahead.
pub(super) async fn stream_out(id: u32, out: &Outbox, mut ctl: mpsc::UnboundedReceiver<Ctl>, work: Producer) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let worker = tokio::task::spawn_blocking(move || {
        let mut sink = ChunkWriter::new(tx);
        work(&mut sink)?;
        sink.flush().map_err(|e| format!("Sending failed: {e}."))
    });
    let credit = Credit::new();
    loop {
        tokio::select! {
            chunk = rx.recv() => {
                let Some(mut chunk) = chunk else { break };
                let mut at = 0;
                while at < chunk.len() {
                    // Wait for credit while still taking the host's messages (credit, close).
                    let n = loop {
                        tokio::select! {
                            n = credit.take((chunk.len() - at) as u32) => break n as usize,
                            msg = ctl.recv() => match msg {
                                Some(Ctl::Credit(Stream::Stdout, n)) => credit.give(n),
                                Some(Ctl::Close) | None => return, // Dropping `rx` stops the worker.
                                Some(_) => {}
                            },
                        }
                    };
                    // The whole chunk moves as it is; only a short credit splits it.
                    let data = if at == 0 && n == chunk.len() { std::mem::take(&mut chunk) } else { chunk[at..at + n].to_vec() };
                    if !out.send(id, Message::Data { stream: Stream::Stdout, data }).await {
                        return;
                    }
                    at += n;
                }
            }
            msg = ctl.recv() => match msg {
                Some(Ctl::Credit(Stream::Stdout, n)) => credit.give(n),
                Some(Ctl::Close) | None => return,
                Some(_) => {}
            },
        }
    }
    let result = worker.await.unwrap_or_else(|_| Err("The file operation panicked.".into()));
    finish(id, out, result).await;
}

/// Feed the host's stdin to `work`, crediting it back as `work` takes it.
pub(super) async fn stream_in(id: u32, out: &Outbox, mut ctl: mpsc::UnboundedReceiver<Ctl>, work: Consumer) {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let mut worker = tokio::task::spawn_blocking(move || work(&mut ChunkReader { rx, pending: Vec::new(), at: 0 }));
    let mut tx = Some(tx);
    let mut in_flight: usize = 0;
    let result = loop {
        tokio::select! {
            result = &mut worker => break result.unwrap_or_else(|_| Err("The file operation panicked.".into())),
            msg = ctl.recv() => match msg {
                Some(Ctl::Stdin(data)) => {
                    in_flight += data.len();
                    if in_flight > INITIAL_WINDOW as usize {
                        eprintln!("moat-agent: channel {id}: the host sent more than its credit allows; closing the channel");
                        out.send(id, Message::Close).await;
                        return;
                    }
                    let n = data.len();
                    // The worker may have stopped reading (it failed); then the bytes are dropped.
                    if let Some(t) = &tx {
                        if t.send(data).await.is_err() {
                            tx = None;
                        }
                    }
                    in_flight -= n;
                    if n > 0 {
                        out.send(id, Message::Credit { stream: Stream::Stdin, bytes: n as u32 }).await;
                    }
                }
                Some(Ctl::StdinEof) => tx = None,
                Some(Ctl::Close) | None => return,
                Some(_) => {}
            },
        }
    };
    finish(id, out, result).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small writes leave as whole chunks (one frame each), a flush sends what is left, and a
    /// writer whose channel task is gone fails instead of blocking.
    #[test]
    fn writes_are_gathered_into_whole_chunks() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let data: Vec<u8> = (0..FILE_CHUNK * 2 + 100).map(|i| i as u8).collect();
        let worker = std::thread::spawn(move || {
            let mut w = ChunkWriter::new(tx);
            for piece in data.chunks(8 * 1024 - 3) {
                w.write_all(piece).unwrap();
            }
            w.flush().unwrap();
        });
        let mut sizes = Vec::new();
        let mut got = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            sizes.push(chunk.len());
            got.extend(chunk);
        }
        worker.join().unwrap();
        assert_eq!(sizes, [FILE_CHUNK, FILE_CHUNK, 100]);
        assert!(got.iter().enumerate().all(|(i, b)| *b == i as u8));

        let (tx, rx) = mpsc::channel(QUEUE);
        drop(rx);
        let mut w = ChunkWriter::new(tx);
        assert!(w.write_all(&vec![0; FILE_CHUNK]).is_err());
        assert!(w.flush().is_err());
    }
}
