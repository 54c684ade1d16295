#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import NIOPosix
import WeftProto

/// A frame as the transport receives it: header checked, payload a slice of the receive buffer
/// (no copy), not yet decoded.
struct InboundFrame: Sendable {
    var header: FrameHeader
    var payload: ByteBuffer
}

/// Splits a byte stream into frames. The length prefix is checked against
/// `WireCodec.maxFrameBytes` as soon as its 4 bytes arrive, before anything is buffered for the
/// frame; a bad length, version or kind throws (EPROTO), which closes the connection.
struct FrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = InboundFrame

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = try Self.nextFrame(from: &buffer) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        // A partial frame at EOF is dropped: the peer is gone and nobody waits for the rest.
        while let frame = try Self.nextFrame(from: &buffer) {
            context.fireChannelRead(wrapInboundOut(frame))
        }
        return .needMoreData
    }

    /// The next whole frame in `buffer`, or nil if it has not fully arrived.
    static func nextFrame(from buffer: inout ByteBuffer) throws -> InboundFrame? {
        guard let rawLength = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) else {
            return nil
        }
        let length = try WireCodec.checkedLength(rawLength)
        let total = WireCodec.lengthPrefixBytes + length
        guard buffer.readableBytes >= total else {
            // Make room for the whole frame once, rather than growing the buffer read by read.
            buffer.reserveCapacity(minimumWritableBytes: total - buffer.readableBytes)
            return nil
        }
        // Checked before the buffer moves on: a bad header leaves the buffer as it was.
        let header = try buffer.withUnsafeReadableBytes {
            try WireCodec.decodeHeader(UnsafeRawBufferPointer(
                rebasing: $0[WireCodec.lengthPrefixBytes..<WireCodec.lengthPrefixBytes + WireCodec.headerBytes]))
        }
        buffer.moveReaderIndex(forwardBy: WireCodec.lengthPrefixBytes + WireCodec.headerBytes)
        let payload = buffer.readSlice(length: length - WireCodec.headerBytes)!
        return InboundFrame(header: header, payload: payload)
    }
}

/// Per-thread scratch space for encoding the small part of a frame, so that encoding allocates
/// nothing but the outgoing buffer.
final class EncodeScratch {
    /// Scratch above this size is released after use rather than kept.
    static let retainedCapacityMaxBytes = 1 << 20
    var writer = ByteWriter(capacity: 4096)

    private static let perThread = ThreadSpecificVariable<EncodeScratch>()

    static var current: EncodeScratch {
        if let scratch = perThread.currentValue { return scratch }
        let scratch = EncodeScratch()
        perThread.currentValue = scratch
        return scratch
    }

    /// Runs `body` with an empty writer.
    func withWriter<T>(_ body: (inout ByteWriter) throws -> T) rethrows -> T {
        writer.bytes.removeAll(keepingCapacity: writer.bytes.capacity <= Self.retainedCapacityMaxBytes)
        defer { writer.bytes.removeAll(keepingCapacity: writer.bytes.capacity <= Self.retainedCapacityMaxBytes) }
        return try body(&writer)
    }
}

extension WireCodec {
    /// A request frame in a buffer of exactly its size; the data of a writeSlice is copied once.
    /// Throws EMSGSIZE for a frame over `maxFrameBytes`.
    static func requestBuffer(id: UInt64, _ request: HubRequest, kind: FrameKind = .request,
                              allocator: ByteBufferAllocator) throws -> ByteBuffer {
        try EncodeScratch.current.withWriter { head in
            let bulk = request.encodeHead(into: &head)
            return try frameBuffer(FrameHeader(kind: kind, opcode: request.opcode.rawValue, requestID: id),
                                   head: head.bytes, bulk: bulk, allocator: allocator)
        }
    }

    /// A response frame; the bytes of a readSlice are copied once. A result too large for a frame
    /// is replaced by an EMSGSIZE error response.
    static func responseBuffer(id: UInt64, rawOpcode: UInt16, _ result: Result<HubResponse, WeftError>,
                               allocator: ByteBufferAllocator) -> ByteBuffer {
        let header = FrameHeader(kind: .response, opcode: rawOpcode, requestID: id)
        do {
            return try EncodeScratch.current.withWriter { head in
                let bulk = encodeResponseHead(rawOpcode: rawOpcode, result, into: &head)
                return try frameBuffer(header, head: head.bytes, bulk: bulk, allocator: allocator)
            }
        } catch {
            let tooLarge = WeftError(EMSGSIZE, "\(error)")
            return EncodeScratch.current.withWriter { head in
                _ = encodeResponseHead(rawOpcode: rawOpcode, .failure(tooLarge), into: &head)
                return try! frameBuffer(header, head: head.bytes, bulk: nil, allocator: allocator)
            }
        }
    }

    private static func frameBuffer(_ header: FrameHeader, head: [UInt8], bulk: [UInt8]?,
                                    allocator: ByteBufferAllocator) throws -> ByteBuffer {
        guard let bulk else { return try frameBuffer(header, head: head, bulkBytes: nil, allocator: allocator) }
        return try bulk.withUnsafeBytes { try frameBuffer(header, head: head, bulkBytes: $0, allocator: allocator) }
    }

    private static func frameBuffer(_ header: FrameHeader, head: [UInt8], bulkBytes: UnsafeRawBufferPointer?,
                                    allocator: ByteBufferAllocator) throws -> ByteBuffer {
        let length = headerBytes + head.count + (bulkBytes?.count ?? 0)
        guard length <= maxFrameBytes else {
            throw WeftError(EMSGSIZE, "a \(length)-byte frame exceeds the \(maxFrameBytes)-byte wire limit")
        }
        var buffer = allocator.buffer(capacity: lengthPrefixBytes + length)
        writeFrameStart(header, length: length, into: &buffer)
        buffer.writeBytes(head)
        if let bulkBytes { buffer.writeBytes(bulkBytes) }
        return buffer
    }

    static func writeFrameStart(_ header: FrameHeader, length: Int, into buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt32(length), endianness: .little)
        buffer.writeInteger(version)
        buffer.writeInteger(header.kind.rawValue)
        buffer.writeInteger(header.opcode, endianness: .little)
        buffer.writeInteger(header.requestID, endianness: .little)
    }

    /// A writeSlice request frame whose data comes from caller memory, copied once, straight
    /// into the frame (the same bytes as `requestBuffer` of `.writeSlice` with that data).
    static func writeSliceRequestBuffer(id: UInt64, context: RequestContext, sliceID: SliceID,
                                        bytes: UnsafeRawBufferPointer, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        try EncodeScratch.current.withWriter { head in
            HubRequest.encodeWriteSliceHead(context, id: sliceID, count: bytes.count, into: &head)
            return try frameBuffer(FrameHeader(kind: .request, opcode: HubOpcode.writeSlice.rawValue, requestID: id),
                                   head: head.bytes, bulkBytes: bytes, allocator: allocator)
        }
    }

    /// The start of a writeSlice (or writeObject: the same payload) request frame whose `count` data bytes the caller sends after
    /// it (`DirectSender.send(_:payload:)`): with them, the same bytes as
    /// `writeSliceRequestBuffer`.
    static func writeSliceRequestHead(id: UInt64, opcode: HubOpcode = .writeSlice, context: RequestContext,
                                      sliceID: SliceID, count: Int, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        try EncodeScratch.current.withWriter { head in
            HubRequest.encodeWriteSliceHead(context, id: sliceID, count: count, into: &head)
            let length = headerBytes + head.bytes.count + count
            guard length <= maxFrameBytes else {
                throw WeftError(EMSGSIZE, "a \(length)-byte frame exceeds the \(maxFrameBytes)-byte wire limit")
            }
            var buffer = allocator.buffer(capacity: lengthPrefixBytes + headerBytes + head.bytes.count)
            writeFrameStart(FrameHeader(kind: .request, opcode: opcode.rawValue, requestID: id),
                            length: length, into: &buffer)
            buffer.writeBytes(head.bytes)
            return buffer
        }
    }

    /// Bytes of a bulk response before its data: length prefix, header, status, data length.
    static let bulkResponseHeadBytes = lengthPrefixBytes + headerBytes + 4 + 4

    /// A successful `.bytes` response of `count` bytes that `fill` writes straight into the
    /// frame (the same bytes as `responseBuffer` of `.success(.bytes(data))`). The data starts
    /// on a page boundary when the allocator's block is page-aligned (`BulkMemory`), so a store
    /// can read into it directly. If `fill` throws, the response is that error instead.
    static func bulkResponseBuffer(id: UInt64, rawOpcode: UInt16, count: Int, allocator: ByteBufferAllocator,
                                   fill: (UnsafeMutableRawBufferPointer) throws -> Void) -> ByteBuffer {
        let length = headerBytes + 8 + count
        guard length <= maxFrameBytes else {
            let error = WeftError(EMSGSIZE, "a \(length)-byte frame exceeds the \(maxFrameBytes)-byte wire limit")
            return responseBuffer(id: id, rawOpcode: rawOpcode, .failure(error), allocator: allocator)
        }
        let pad = count >= Limits.blockSizeBytes ? BulkMemory.pageBytes - bulkResponseHeadBytes : 0
        var buffer = allocator.buffer(capacity: pad + lengthPrefixBytes + length)
        buffer.moveWriterIndex(forwardBy: pad)
        buffer.moveReaderIndex(forwardBy: pad)
        writeFrameStart(FrameHeader(kind: .response, opcode: rawOpcode, requestID: id), length: length, into: &buffer)
        buffer.writeInteger(Int32(0), endianness: .little)
        buffer.writeInteger(UInt32(count), endianness: .little)
        do {
            _ = try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { free in
                try fill(UnsafeMutableRawBufferPointer(rebasing: free[0..<count]))
                return count
            }
        } catch {
            let failure = error as? WeftError ?? WeftError(EIO, "hub failed: \(error)")
            return responseBuffer(id: id, rawOpcode: rawOpcode, .failure(failure), allocator: allocator)
        }
        return buffer
    }

    /// Decodes a `.bytes` response straight into `destination`: success only if the hub sent
    /// exactly `destination.count` bytes. Throws for a malformed payload, like `decodeResponse`.
    static func decodeBulkResponse(opcode: HubOpcode, payload: ByteBuffer,
                                   into destination: UnsafeMutableRawBufferPointer) throws -> Result<Void, WeftError> {
        try payload.withUnsafeReadableBytes { raw in
            var reader = ByteReader(raw)
            guard try reader.i32() == 0 else { return try decodeResponse(opcode: opcode, payload: raw).map { _ in () } }
            let count = Int(try reader.u32())
            let bytes = try reader.rawSlice(count)
            guard reader.isAtEnd else { throw trailingBytes(reader.remaining, opcode) }
            guard count == destination.count else {
                return .failure(WeftError(EIO, "the hub sent \(count) bytes for a \(destination.count)-byte \(opcode.name)"))
            }
            destination.copyMemory(from: bytes)
            return .success(())
        }
    }

    /// Decodes a request payload in place (the only copies are the byte strings it contains).
    static func decodeRequest(opcode: HubOpcode, payload: ByteBuffer) throws -> HubRequest {
        try payload.withUnsafeReadableBytes { try decodeRequest(opcode: opcode, payload: $0) }
    }

    static func decodeResponse(opcode: HubOpcode, payload: ByteBuffer) throws -> Result<HubResponse, WeftError> {
        try payload.withUnsafeReadableBytes { try decodeResponse(opcode: opcode, payload: $0) }
    }
}
