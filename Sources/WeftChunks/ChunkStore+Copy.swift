#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import WeftProto

/// Copying objects between stores of different hubs (SPEC.md §12.5): the holder sends its file
/// as it is; the receiver checks it whole (header and every block's CRC32C) before keeping it.
extension ChunkStore {
    /// Bytes `[offset, offset+length)` of object `id`'s file (clamped to its end), unverified,
    /// and the file's length. ENOENT if the object is missing.
    public func readObjectFile(id: SliceID, offset: Int, length: Int) throws -> (fileBytes: Int, bytes: [UInt8]) {
        let fd = FileIO.withObjectPath(id) { openat(root, $0, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else {
            let code = errno
            if code == ENOENT { throw WeftError(ENOENT, "chunk \(hex(id)) missing") }
            throw WeftError(code == EMFILE || code == ENFILE ? code : EIO, "cannot open chunk \(hex(id))")
        }
        defer { close(fd) }
        do {
            let fileBytes = try FileIO.fileBytes(fd)
            guard offset >= 0, length >= 0, offset <= fileBytes else {
                throw WeftError(EINVAL, "range \(offset)+\(length) outside the file of chunk \(hex(id))")
            }
            let count = min(length, fileBytes - offset)
            var got = 0
            let bytes = try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
                if count > 0 { got = try FileIO.preadFully(fd, buffer.baseAddress!, count, offset) }
                initialized = got
            }
            guard got == count else { throw WeftError(EIO, "chunk \(hex(id)) file shrank while read") }
            return (fileBytes, bytes)
        } catch let failure as FileIO.Failure {
            throw WeftError(EIO, "chunk \(hex(id)) read failed: \(failure.description)")
        }
    }

    /// Keeps `file`, a copy of another store's file of object `id`, after checking it whole:
    /// the header (magic, version, id, lengths, header CRC) and the CRC32C of every block's raw
    /// bytes, decompressing as needed. A copy that fails any check throws EIO naming the
    /// object and the reason and stores nothing. Not made durable (a cache copy need not be);
    /// EEXIST if the id is already stored.
    public func importObject(id: SliceID, file: [UInt8]) throws {
        try checkWritable(id)
        try file.withUnsafeBytes { raw in
            let layout: ChunkLayout
            do {
                let prefix = UnsafeRawBufferPointer(rebasing: raw[0..<min(raw.count, ChunkFormat.maxHeaderBytes)])
                layout = try ChunkFormat.decodeHeader(prefix, fileBytes: raw.count, expectedID: id)
            } catch let damage as ChunkDamage {
                throw WeftError(EIO, "copy of chunk \(hex(id)) damaged at \(damage.block): \(damage.reason)")
            }
            if let (block, reason) = workspaces.with({ layout.firstDamagedBlock(in: raw, workspace: $0) }) {
                throw WeftError(EIO, "copy of chunk \(hex(id)) damaged at block \(block): \(reason)")
            }
            let header = UnsafeRawBufferPointer(rebasing: raw[0..<layout.dataOffset])
            let payload = UnsafeRawBufferPointer(rebasing: raw[layout.dataOffset...])
            let fd = try createObject(id: id, header: header, payload: payload.isEmpty ? [] : [payload], direct: nil)
            close(fd)
            accountCreated(fileBytes: raw.count)
        }
    }
}
