import Foundation
import WeftChunks
import WeftProto
import XCTest

/// A hand-run throughput check, not a timed test: it only prints figures.
///
///     WEFT_CHUNK_BENCH=1 swift test -c release --filter ChunkBenchmarkTests
///
/// Writes 1 GiB as 256 objects of 4 MiB, then reads it back in 1 MiB reads with every block
/// verified (from the page cache), on one thread and on two, and runs `verify` over all of it.
final class ChunkBenchmarkTests: ChunkTestCase {
    static let objectBytes = 4 << 20
    static let objectCount = 256
    static let readBytes = 1 << 20

    override func setUpWithError() throws {
        guard ProcessInfo.processInfo.environment["WEFT_CHUNK_BENCH"] == "1" else {
            throw XCTSkip("set WEFT_CHUNK_BENCH=1 to run the chunk store benchmark")
        }
        try super.setUpWithError()
    }

    private func seconds(_ body: () throws -> Void) rethrows -> Double {
        let start = DispatchTime.now().uptimeNanoseconds
        try body()
        return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    }

    private func report(_ what: String, bytes: Int, seconds: Double) {
        print(String(format: "chunk bench: %@: %.0f MB/s (%.2f s)", what, Double(bytes) / seconds / 1e6, seconds))
    }

    private func run(_ compression: Compression, _ make: (Int, inout SeededRandom) -> [UInt8], label: String) throws {
        try? FileManager.default.removeItem(atPath: directory)
        let store = try makeStore(compression)
        var random = SeededRandom(seed: 1)
        var data = make(Self.objectBytes, &random)
        let total = Self.objectBytes * Self.objectCount
        let writeTime = try seconds {
            for id in 0..<SliceID(Self.objectCount) {
                data.withUnsafeMutableBytes { $0.storeBytes(of: id, as: UInt64.self) }  // distinct contents
                try store.write(id: id, data: data)
            }
        }
        // The 256th unsynced write runs a sync pass itself (backpressure), so this includes the fsyncs.
        report("\(label) write (incl. fsync of all 256)", bytes: total, seconds: writeTime)
        let syncTime = try seconds { try store.sync() }
        print(String(format: "chunk bench: %@ final sync: %.3f s", label, syncTime))
        print("chunk bench: \(label) stored \(store.storedBytes / 1_000_000) MB for \(total / 1_000_000) MB")

        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.readBytes, alignment: 64)
        defer { buffer.deallocate() }
        func readAll(_ ids: StrideTo<Int>, into buffer: UnsafeMutableRawBufferPointer) throws {
            for id in ids {
                for offset in stride(from: 0, to: Self.objectBytes, by: Self.readBytes) {
                    try store.read(id: SliceID(id), offset: offset, into: buffer)
                }
            }
        }
        // Cold: drop the (synced, clean) pages from the page cache first.
        for id in 0..<SliceID(Self.objectCount) {
            let fd = open(objectPath(id), O_RDONLY)
            _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
            close(fd)
        }
        let coldTime = try seconds { try readAll(stride(from: 0, to: Self.objectCount, by: 1), into: buffer) }
        report("\(label) 1 MiB read(into:) 1 thread, cold page cache", bytes: total, seconds: coldTime)
        for round in 1...2 {
            let time = try seconds { try readAll(stride(from: 0, to: Self.objectCount, by: 1), into: buffer) }
            report("\(label) 1 MiB read(into:) 1 thread, round \(round)", bytes: total, seconds: time)
        }
        let arrayTime = try seconds {
            for id in 0..<Self.objectCount {
                for offset in stride(from: 0, to: Self.objectBytes, by: Self.readBytes) {
                    _ = try store.read(id: SliceID(id), offset: offset, length: Self.readBytes)
                }
            }
        }
        report("\(label) 1 MiB read() -> [UInt8] 1 thread", bytes: total, seconds: arrayTime)
        let twoThreadTime = seconds {
            DispatchQueue.concurrentPerform(iterations: 2) { thread in
                let own = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.readBytes, alignment: 64)
                defer { own.deallocate() }
                try! readAll(stride(from: thread, to: Self.objectCount, by: 2), into: own)
            }
        }
        report("\(label) 1 MiB read(into:) 2 threads", bytes: total, seconds: twoThreadTime)
        let verifyTime = try seconds {
            for id in 0..<SliceID(Self.objectCount) { _ = try store.verify(id: id) }
        }
        report("\(label) verify", bytes: total, seconds: verifyTime)

        var small = random
        let count = 200_000
        let smallTime = try seconds {
            for _ in 0..<count {
                let id = SliceID(small.next() % UInt64(Self.objectCount))
                let offset = Int(small.next() % UInt64(Self.objectBytes / 4096)) * 4096
                try store.read(id: id, offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<4096]))
            }
        }
        print(String(format: "chunk bench: %@ random 4 KiB reads 1 thread: %.0f reads/s", label, Double(count) / smallTime))
    }

    func testThroughputUncompressed() throws {
        try run(.none, TestData.random, label: "none/random")
    }

    func testThroughputZstdIncompressible() throws {
        try run(.zstd, TestData.random, label: "zstd/random")
    }

    func testThroughputZstdCompressible() throws {
        try run(.zstd, TestData.compressible, label: "zstd/text")
    }
}
