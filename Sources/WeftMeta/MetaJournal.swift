import Foundation
import Logging
import WeftProto
#if canImport(Glibc)
import Glibc
#endif

/// The metadata engine's write-ahead log (SPEC.md §3.3): RocksDB batches in their serialized
/// form, written over blocks the file already has, so that syncing them writes data only.
///
/// Guarantees: `append` writes a record at the tail (in the kernel once it returns); `sync`
/// makes every appended record durable; `open` hands the current lap's records to `replay` in
/// the order they were appended, up to the first record that is not intact. Not thread-safe
/// except `sync`: the metadata engine calls everything else under its lock.
final class MetaJournal {
    static let fileName = "weft-journal"
    static let version: UInt32 = 1
    static let magic: [UInt8] = Array("WEFTJNL1".utf8)
    static let superblockSlotBytes = 4096
    static let recordsStart = 2 * superblockSlotBytes
    static let recordHeaderBytes = 24

    /// How the file grows and how large it gets; tests shrink it to make laps short.
    struct Geometry {
        var growthStepBytes = 1 << 20
        var maxBytes = 64 << 20
        /// A batch larger than this is not logged: it is applied and checkpointed at once.
        var largestRecordBytes = 8 << 20
    }

    /// What `open` found.
    struct Recovery {
        var lap: UInt64
        var replayedRecords: Int
        /// Intact records of the lap after the first one that was not (warned about, not applied).
        var skippedRecords: Int
    }

    let path: String
    let geometry: Geometry
    private let fd: Int32
    private let logger: Logger
    private(set) var lap: UInt64
    private var tail = MetaJournal.recordsStart
    private var nextSeq: UInt64 = 1
    private(set) var fileBytes: Int
    private var scratch: [UInt8] = []
    /// The errno of a failed `fdatasync`; every later sync fails with it (the kernel may have
    /// dropped the pages it could not write, so a retry that succeeds would prove nothing).
    private let syncState = NSLock()
    private var syncFailure: Int32 = 0

    private init(path: String, fd: Int32, lap: UInt64, fileBytes: Int, geometry: Geometry, logger: Logger) {
        self.path = path
        self.fd = fd
        self.lap = lap
        self.fileBytes = fileBytes
        self.geometry = geometry
        self.logger = logger
    }

    deinit { close(fd) }

    static func path(inDirectory directory: String) -> String { directory + "/" + fileName }

    static func exists(inDirectory directory: String) -> Bool {
        FileManager.default.fileExists(atPath: path(inDirectory: directory))
    }

    /// Writes an empty journal (lap 1) into `directory` under a temporary name, syncs it, renames
    /// it into place and syncs the directory: a journal that exists always has a superblock.
    static func create(inDirectory directory: String, geometry: Geometry) throws {
        let final = path(inDirectory: directory), temporary = final + ".new"
        let fd = Glibc.open(temporary, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw WeftError(errno, "create \(temporary)") }
        defer { close(fd) }
        try writeZeros(fd, from: 0, to: min(geometry.growthStepBytes, geometry.maxBytes), path: temporary)
        try writeSuperblock(fd, lap: 1, path: temporary)
        guard rename(temporary, final) == 0 else { throw WeftError(errno, "rename \(temporary)") }
        try syncDirectory(directory)
    }

    /// Opens the journal in `directory` and replays the current lap's intact records, in order.
    /// The caller checkpoints afterwards (the next append would otherwise follow the replayed
    /// records of the same lap, which is also correct).
    static func open(inDirectory directory: String, geometry: Geometry, logger: Logger,
                     replay: (UnsafeRawBufferPointer) throws -> Void) throws -> (MetaJournal, Recovery) {
        let filePath = path(inDirectory: directory)
        let fd = Glibc.open(filePath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw WeftError(errno, "open \(filePath)") }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let code = errno
            close(fd)
            throw WeftError(code, "stat \(filePath)")
        }
        let fileBytes = Int(info.st_size)
        guard let lap = (0..<2).compactMap({ readSuperblock(fd, slot: $0) }).max() else {
            close(fd)
            throw WeftError(EIO, "metadata journal \(filePath) is damaged: neither superblock is intact")
        }
        let journal = MetaJournal(path: filePath, fd: fd, lap: lap, fileBytes: fileBytes, geometry: geometry,
                                  logger: logger)
        var recovery = Recovery(lap: lap, replayedRecords: 0, skippedRecords: 0)
        try journal.replayLap(into: &recovery, replay)
        return (journal, recovery)
    }

    /// Where the next record goes.
    var tailOffset: Int { tail }

    /// Bytes a record of `payloadBytes` takes, header and padding included.
    static func recordBytes(payload payloadBytes: Int) -> Int {
        (recordHeaderBytes + payloadBytes + 7) & ~7
    }

    /// Appends one record. Returns its offset, or nil when it does not fit before the journal's
    /// end and the file cannot grow (the caller checkpoints, which starts a lap, and tries again).
    func append(_ payload: UnsafeRawBufferPointer) throws -> Int? {
        let recordBytes = Self.recordBytes(payload: payload.count)
        precondition(recordBytes <= geometry.maxBytes - Self.recordsStart, "a record larger than the journal")
        if tail + recordBytes > min(fileBytes, geometry.maxBytes) {
            // (A file larger than the geometry allows, from an earlier geometry, is used up to it.)
            guard fileBytes < geometry.maxBytes else { return nil }
            let wanted = min(geometry.maxBytes,
                             (tail + recordBytes + geometry.growthStepBytes - 1) / geometry.growthStepBytes
                                 * geometry.growthStepBytes)
            do {
                try Self.writeZeros(fd, from: fileBytes, to: wanted, path: path)
                fileBytes = wanted
            } catch let error as WeftError where error.errno == ENOSPC {
                logger.warning("metadata journal cannot grow past \(fileBytes) bytes: the disk is full; it wraps there")
                return nil
            }
            if tail + recordBytes > fileBytes { return nil }
        }
        // The record is built in one reused buffer: header, payload, padding (no allocation).
        scratch.removeAll(keepingCapacity: true)
        withUnsafeBytes(of: lap.littleEndian) { scratch.append(contentsOf: $0) }
        withUnsafeBytes(of: nextSeq.littleEndian) { scratch.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt32(payload.count).littleEndian) { scratch.append(contentsOf: $0) }
        let checksum = crc32c(payload, seed: scratch.withUnsafeBytes { crc32c($0) })
        withUnsafeBytes(of: checksum.littleEndian) { scratch.append(contentsOf: $0) }
        scratch.append(contentsOf: payload)
        scratch.append(contentsOf: repeatElement(0, count: recordBytes - scratch.count))
        let offset = tail
        try scratch.withUnsafeBytes { try Self.pwriteFully(fd, $0, at: offset, path: path) }
        tail += recordBytes
        nextSeq += 1
        return offset
    }

    /// Takes back the last record (at `offset`, from `append`) after its batch failed to apply:
    /// its header is zeroed so that a replay ends before it.
    func rollBack(to offset: Int) {
        let zeros = [UInt8](repeating: 0, count: Self.recordHeaderBytes)
        try? zeros.withUnsafeBytes { try Self.pwriteFully(fd, $0, at: offset, path: path) }
        tail = offset
        nextSeq -= 1
    }

    /// Makes every appended record durable. Thread-safe.
    func sync() throws {
        syncState.lock()
        defer { syncState.unlock() }
        if syncFailure != 0 { throw WeftError(syncFailure, "metadata journal \(path): an earlier sync failed") }
        guard fdatasync(fd) == 0 else {
            syncFailure = errno
            throw WeftError(syncFailure, "fdatasync \(path)")
        }
    }

    /// Starts the next lap: its superblock is written and synced, and records start over at the
    /// beginning. Only after a checkpoint (every logged change in RocksDB's files).
    func startLap() throws {
        try Self.writeSuperblock(fd, lap: lap + 1, path: path)
        lap += 1
        tail = Self.recordsStart
        nextSeq = 1
    }

    // MARK: replay

    private func replayLap(into recovery: inout Recovery, _ replay: (UnsafeRawBufferPointer) throws -> Void) throws {
        // One read of the whole file (at most `geometry.maxBytes`, once per open).
        var image = [UInt8](repeating: 0, count: fileBytes)
        let readBytes = try image.withUnsafeMutableBytes { try Self.preadFully(fd, $0, path: path) }
        try image.withUnsafeBytes { whole in
            let file = UnsafeRawBufferPointer(rebasing: whole[0..<readBytes])
            var offset = Self.recordsStart
            var expectedSeq: UInt64 = 1
            var ended = false
            while offset + Self.recordHeaderBytes <= file.count {
                let record = Self.record(in: file, at: offset, lap: lap)
                if !ended, let record, record.seq == expectedSeq {
                    try replay(record.payload)
                    recovery.replayedRecords += 1
                    expectedSeq += 1
                    offset += Self.recordBytes(payload: record.payload.count)
                    tail = offset
                    continue
                }
                // Past the end of the replay: count the intact records of this lap that follow,
                // so that damage in the middle of a lap is reported rather than silent.
                ended = true
                if let record, record.seq > expectedSeq {
                    recovery.skippedRecords += 1
                    offset += Self.recordBytes(payload: record.payload.count)
                } else {
                    offset += 8
                }
            }
            nextSeq = expectedSeq
        }
        if recovery.skippedRecords > 0 {
            logger.warning("""
                metadata journal \(path): replay stopped at byte \(tail) of lap \(lap); \
                \(recovery.skippedRecords) intact records after it were not applied \
                (a write torn by a crash, or damage)
                """)
        }
    }

    /// The intact record of `lap` at `offset` of `file`, or nil.
    private static func record(in file: UnsafeRawBufferPointer, at offset: Int,
                               lap: UInt64) -> (seq: UInt64, payload: UnsafeRawBufferPointer)? {
        let recordLap = UInt64(littleEndian: file.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
        guard recordLap == lap else { return nil }
        let seq = UInt64(littleEndian: file.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self))
        let length = Int(UInt32(littleEndian: file.loadUnaligned(fromByteOffset: offset + 16, as: UInt32.self)))
        let stored = UInt32(littleEndian: file.loadUnaligned(fromByteOffset: offset + 20, as: UInt32.self))
        let payloadStart = offset + recordHeaderBytes
        guard length <= file.count - payloadStart else { return nil }
        let payload = UnsafeRawBufferPointer(rebasing: file[payloadStart..<(payloadStart + length)])
        let checksum = crc32c(payload, seed: crc32c(UnsafeRawBufferPointer(rebasing: file[offset..<(offset + 20)])))
        return checksum == stored ? (seq, payload) : nil
    }

    /// Reads from the start of the file into `buffer` until it is full or the file ends.
    private static func preadFully(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, path: String) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw WeftError(errno, "read \(path)")
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    // MARK: file helpers

    private static func superblock(lap: UInt64) -> [UInt8] {
        var writer = ByteWriter()
        writer.raw(magic)
        writer.u32(version)
        writer.u32(0)
        writer.u64(lap)
        writer.u32(crc32c(writer.bytes))
        return writer.bytes + [UInt8](repeating: 0, count: superblockSlotBytes - writer.bytes.count)
    }

    private static func readSuperblock(_ fd: Int32, slot: Int) -> UInt64? {
        var bytes = [UInt8](repeating: 0, count: 28)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, 28, off_t(slot * superblockSlotBytes)) }
        guard n == 28 else { return nil }
        return bytes.withUnsafeBytes { block -> UInt64? in
            let version = UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            let reserved = UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
            let lap = UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
            let stored = UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 24, as: UInt32.self))
            guard block[0..<8].elementsEqual(magic), version == Self.version, reserved == 0, Int(lap % 2) == slot,
                  crc32c(UnsafeRawBufferPointer(rebasing: block[0..<24])) == stored else { return nil }
            return lap
        }
    }

    private static func writeSuperblock(_ fd: Int32, lap: UInt64, path: String) throws {
        try superblock(lap: lap).withUnsafeBytes {
            try pwriteFully(fd, $0, at: Int(lap % 2) * superblockSlotBytes, path: path)
        }
        guard fdatasync(fd) == 0 else { throw WeftError(errno, "fdatasync \(path)") }
    }

    private static func writeZeros(_ fd: Int32, from start: Int, to end: Int, path: String) throws {
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        var offset = start
        while offset < end {
            let count = min(zeros.count, end - offset)
            try zeros.withUnsafeBytes { try pwriteFully(fd, UnsafeRawBufferPointer(rebasing: $0[0..<count]), at: offset, path: path) }
            offset += count
        }
        guard fdatasync(fd) == 0 else { throw WeftError(errno, "fdatasync \(path)") }
    }

    private static func pwriteFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: Int, path: String) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw WeftError(errno, "write \(path)")
            }
            done += n
        }
    }

    private static func syncDirectory(_ directory: String) throws {
        let fd = Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw WeftError(errno, "open \(directory)") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw WeftError(errno, "fsync \(directory)") }
    }
}
