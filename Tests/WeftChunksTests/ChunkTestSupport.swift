import Foundation
import Logging
import WeftChunks
import WeftProto
import WeftTestSupport
import XCTest


/// Records every log line, so tests can check that damage is logged exactly once.
final class CapturedLog: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [(Logger.Level, String)] = []

    func append(_ level: Logger.Level, _ line: String) {
        lock.lock(); defer { lock.unlock() }
        lines.append((level, line))
    }

    var errors: [String] {
        lock.lock(); defer { lock.unlock() }
        return lines.filter { $0.0 >= .error }.map { $0.1 }
    }

    func reset() {
        lock.lock(); defer { lock.unlock() }
        lines.removeAll()
    }

    var logger: Logger {
        Logger(label: "weft.chunks.test") { _ in CapturingHandler(log: self) }
    }
}

struct CapturingHandler: LogHandler {
    let log: CapturedLog
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        log.append(event.level, event.message.description)
    }
}

/// A fresh directory under the system temporary directory, removed by `tearDown`.
class ChunkTestCase: XCTestCase {
    var directory = ""
    let log = CapturedLog()

    override func setUpWithError() throws {
        directory = NSTemporaryDirectory() + "weft-chunks-\(UUID().uuidString)"
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: directory)
    }

    func makeStore(_ compression: Compression = .none, directIO: Bool = true, directReads: Bool = true,
                   spanCacheBytes: Int = 0) throws -> ChunkStore {
        try ChunkStore(directory: directory, compression: compression, logger: log.logger, directIO: directIO,
                       directReads: directReads, spanCacheBytes: spanCacheBytes)
    }

    func objectPath(_ id: SliceID) -> String {
        let name = String(format: "%016llx", id)
        return "\(directory)/\(String(format: "%02llx", id & 0xFF))/\(name)"
    }

    func fileBytes(_ id: SliceID) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: objectPath(id))))
    }

    func setFileBytes(_ id: SliceID, _ bytes: [UInt8]) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: objectPath(id)))
    }

    /// Flips every bit of the byte at `offset` of object `id`'s file.
    func corrupt(_ id: SliceID, at offset: Int) throws {
        var bytes = try fileBytes(id)
        bytes[offset] ^= 0xFF
        try setFileBytes(id, bytes)
    }

    func assertErrno<T>(_ expected: Int32, _ body: @autoclosure () throws -> T, _ message: String = "",
                        file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try body(), message, file: file, line: line) { error in
            guard let weft = error as? WeftError else {
                return XCTFail("not a WeftError: \(error) \(message)", file: file, line: line)
            }
            XCTAssertEqual(weft.errno, expected, "\(weft) \(message)", file: file, line: line)
        }
    }
}

/// The decoded block table of a stored file, parsed independently of the store as a check on
/// the documented format.
struct ParsedObject {
    struct Block {
        var fileOffset: Int
        var storedLength: Int
        var crc: UInt32
        var flags: UInt8
    }
    var version: UInt8
    var compression: UInt8
    var id: UInt64
    var rawLength: Int
    var blockSize: Int
    var blocks: [Block]
    var headerLength: Int
    /// Where the payloads start: the field at 28 in version 2, right after the header in version 1.
    var dataOffset: Int

    init(_ bytes: [UInt8]) {
        func u32(_ at: Int) -> UInt32 { bytes[at..<at + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
        func u64(_ at: Int) -> UInt64 { bytes[at..<at + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) } }
        precondition(Array(bytes[0..<4]) == Array("WFTC".utf8))
        version = bytes[4]
        compression = bytes[5]
        id = u64(8)
        rawLength = Int(u32(16))
        blockSize = Int(u32(20))
        let count = Int(u32(24))
        headerLength = 32 + 12 * count + 4
        dataOffset = version >= 2 ? Int(u32(28)) : headerLength
        var offset = dataOffset
        blocks = []
        for index in 0..<count {
            let at = 32 + 12 * index
            let stored = Int(u32(at))
            blocks.append(Block(fileOffset: offset, storedLength: stored, crc: u32(at + 4), flags: bytes[at + 8]))
            offset += stored
        }
    }
}

enum TestData {
    static func random(_ count: Int, _ random: inout SeededRandom) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var index = 0
        while index < count {
            var word = random.next()
            for _ in 0..<8 where index < count {
                bytes[index] = UInt8(truncatingIfNeeded: word)
                word >>= 8
                index += 1
            }
        }
        return bytes
    }

    /// Text-like bytes that zstd shrinks several times over.
    static func compressible(_ count: Int, _ random: inout SeededRandom) -> [UInt8] {
        let words = ["chunk", "slice", "weft", "block", "inode", "hub", "agent", "durable", "sync", "read"]
            .map { Array($0.utf8) + [0x20] }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(count + 16)
        while bytes.count < count {
            bytes += words[Int(random.next() % UInt64(words.count))]
        }
        return Array(bytes[0..<count])
    }

    /// Alternating 64 KiB blocks of compressible and random bytes.
    static func mixed(_ count: Int, _ random: inout SeededRandom) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(count)
        var block = 0
        while bytes.count < count {
            let length = min(Limits.blockSizeBytes, count - bytes.count)
            bytes += block % 2 == 0 ? compressible(length, &random) : TestData.random(length, &random)
            block += 1
        }
        return bytes
    }
}
